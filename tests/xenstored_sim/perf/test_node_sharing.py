"""Memory levers of the store: leaves share one empty child mapping, child names are
interned, and neither sharing leaks between a transaction's copies and the store."""

from __future__ import annotations

from typing import Any

import pytest

from xenstored_sim.core import XenstoreEngine
from xenstored_sim.core.errors import XsErrno
from xenstored_sim.core.journal import Journal, load_snapshot
from xenstored_sim.core.paths import canonicalize
from xenstored_sim.core.perms import DEFAULT_PERMS
from xenstored_sim.core.store import NO_CHILDREN, Node
from xenstored_sim.wire import Op

# ``h`` is the engine harness of tests/xenstored_sim/conftest.py.
Harness = Any


def test_leaf_shares_the_empty_children_and_grows_its_own() -> None:
    a = Node(b"", DEFAULT_PERMS)
    b = Node(b"", DEFAULT_PERMS, {})
    assert a.children is NO_CHILDREN and b.children is NO_CHILDREN
    a.add_child("x")
    a.add_child("y")
    a.remove_child("x")
    a.add_child("x")  # a removed and re-created child goes to the end, as in C
    assert list(a.children) == ["y", "x"]
    assert b.children is NO_CHILDREN and not NO_CHILDREN
    a.remove_child("y")
    a.remove_child("missing")
    assert list(a.children) == ["x"]
    a.remove_child("x")
    assert a.children is NO_CHILDREN
    with pytest.raises(TypeError):
        NO_CHILDREN["z"] = None  # type: ignore[index]


def test_copy_does_not_share_a_parents_children() -> None:
    parent = Node(b"", DEFAULT_PERMS, {"a": None})
    copy = parent.copy()
    copy.add_child("b")
    assert list(parent.children) == ["a"]
    assert list(copy.children) == ["a", "b"]


def test_recurring_child_names_are_stored_once(h: Harness) -> None:
    priv = h.socket()
    for path in (b"/one/leaf", b"/two/deeper/leaf", b"/three/leaf"):
        assert h.req(priv, Op.WRITE, path + b"\0v") == b"OK\0"
    nodes = h.engine.store.nodes
    names = [next(iter(nodes[p].children)) for p in ("/one", "/two/deeper", "/three")]
    assert names == ["leaf", "leaf", "leaf"]
    assert names[0] is names[1] is names[2]
    assert nodes["/one/leaf"].children is NO_CHILDREN


def test_transaction_children_stay_private_until_commit(h: Harness) -> None:
    priv = h.socket()
    assert h.req(priv, Op.WRITE, b"/leaf\0v") == b"OK\0"
    for commit in (b"F\0", b"T\0"):
        tx = int(h.req(priv, Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        assert h.req(priv, Op.WRITE, b"/leaf/child\0c", tx) == b"OK\0"
        assert h.engine.store.nodes["/leaf"].children is NO_CHILDREN
        assert h.req(priv, Op.TRANSACTION_END, commit, tx) == b"OK\0"
    assert list(h.engine.store.nodes["/leaf"].children) == ["child"]
    assert h.req(priv, Op.RM, b"/leaf/child\0") == b"OK\0"
    assert h.engine.store.nodes["/leaf"].children is NO_CHILDREN
    assert h.req(priv, Op.DIRECTORY, b"/leaf\0") == b""


def test_restored_store_shares_leaves_and_names(h: Harness) -> None:
    priv = h.socket()
    for d in (1, 2):
        assert h.req(priv, Op.WRITE, b"/local/domain/%d/name\0x" % d) == b"OK\0"
    restored = XenstoreEngine()
    assert load_snapshot(restored, Journal(h.engine).snapshot(7)) == 7
    nodes = restored.store.nodes
    assert nodes["/local/domain/1/name"].children is NO_CHILDREN
    one = next(iter(nodes["/local/domain/1"].children))
    two = next(iter(nodes["/local/domain/2"].children))
    assert one == "name" and one is two


def test_path_validation_cache_keeps_errors_and_limits() -> None:
    for _ in range(2):  # errors are not cached: each bad request is refused again
        with pytest.raises(XsErrno) as bad:
            canonicalize(b"/bad//path", "/local/domain/0", 1024)
        assert bad.value.errno_name == "EINVAL"
    assert canonicalize(b"/abcdef", "/local/domain/0", 1024) == "/abcdef"
    with pytest.raises(XsErrno):
        canonicalize(b"/abcdef", "/local/domain/0", 3)  # the path-max quota is part of the key
    assert canonicalize(b"rel", "/local/domain/5", 1024) == "/local/domain/5/rel"
    assert canonicalize(b"rel", "/local/domain/6", 1024) == "/local/domain/6/rel"

"""Regression tests of the xenstore security advisories (xenstore-facts.md §9), each against a
real ``xenstored-sim`` process over its privileged socket and its guest sockets.

XSA-38 (§9.1) is about ring indexes a guest writes into its shared ring page; guest sockets have
no ring page, so it cannot apply here.  XSA-206, XSA-326's outstanding and memory bounds and
XSA-416 need a flooding client and an RSS measurement: they live in ``test_dos.py``.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

import pytest

from xenstored_sim.wire import Op

Start = Callable[..., Any]


def home(priv: Any, domid: int) -> None:
    """Create ``/local/domain/<domid>`` owned by the domain, as a toolstack does."""
    path = b"/local/domain/%d\0" % domid
    assert priv.req(Op.WRITE, path) == b"OK\0"
    assert priv.req(Op.SET_PERMS, path + b"n%d\0" % domid) == b"OK\0"


def alive(d: Any) -> None:
    """The daemon runs, passes its consistency check and serves a fresh connection."""
    assert d.proc.poll() is None
    fresh = d.conn()
    assert fresh.req(Op.CONTROL, b"check\0") == b"OK\0"
    assert fresh.req(Op.WRITE, b"/alive\0yes") == b"OK\0"
    assert fresh.req(Op.READ, b"/alive\0") == b"yes"
    assert fresh.req(Op.RM, b"/alive\0") == b"OK\0"


def usage(priv: Any, domid: int) -> dict[str, int]:
    """CONTROL ``quota <domid>``: the daemon's own accounting of the domain."""
    text = priv.req(Op.CONTROL, b"quota\0%d\0" % domid)
    assert isinstance(text, bytes), text
    out = {}
    for line in text.rstrip(b"\0").decode().splitlines()[1:]:
        name, _, value = line.partition(":")
        out[name.strip()] = int(value)
    return out


def walk(conn: Any, top: bytes = b"/") -> set[bytes]:
    """Every node reachable from ``top`` by DIRECTORY (iteratively)."""
    seen: set[bytes] = set()
    stack = [top]
    while stack:
        path = stack.pop()
        seen.add(path)
        names = conn.req(Op.DIRECTORY, path + b"\0")
        assert isinstance(names, bytes), (path, names)
        for name in names.split(b"\0")[:-1]:
            stack.append((b"" if path == b"/" else path) + b"/" + name)
    return seen


def sync_event(watcher: Any, priv: Any, path: bytes) -> bytes:
    """Write ``path`` (which ``watcher`` can read) and return the next event it receives:
    any event that should have been filtered would arrive before this one."""
    assert priv.req(Op.WRITE, path + b"\0v") == b"OK\0"
    event: bytes = watcher.event()
    return event


def audit_denied(d: Any) -> list[dict[str, Any]]:
    assert d.audit is not None
    records = [json.loads(line) for line in d.audit.read_text().splitlines()]
    return [r for r in records if r.get("result") in ("EACCES", "EPERM")]


# -- XSA-72: replies never exceed 4096 bytes ----------------------------------------------------


def test_xsa_72_directory_larger_than_payload_max_is_e2big(xsd: Start) -> None:
    d = xsd()
    names = [b"child-%04d-%s" % (i, b"x" * 40) for i in range(100)]
    for name in names:
        assert d.priv.req(Op.WRITE, b"/big/" + name + b"\0") == b"OK\0"
    assert d.priv.req(Op.DIRECTORY, b"/big\0") == "E2BIG"
    got: list[bytes] = []
    offset = 0
    while True:
        part = d.priv.req(Op.DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert isinstance(part, bytes) and len(part) <= 4096
        chunk = part.split(b"\0", 1)[1]  # generation, then the names
        if chunk in (b"", b"\0"):
            break
        batch = [n for n in chunk.split(b"\0") if n]
        got.extend(batch)
        offset += sum(len(n) + 1 for n in batch)
        if chunk.endswith(b"\0\0"):
            break
    assert got == names
    alive(d)


# -- XSA-115: watch events are filtered by permissions ------------------------------------------


def test_xsa_115a_guest_watching_root_sees_no_unreadable_nodes(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    assert d.priv.req(Op.WRITE, b"/open\0") == b"OK\0"
    assert d.priv.req(Op.SET_PERMS, b"/open\0r1\0") == b"OK\0"
    assert g.req(Op.WATCH, b"/\0tok\0") == b"OK\0"
    assert g.event() == b"/\0tok\0"
    assert d.priv.req(Op.WRITE, b"/secret\0hidden") == b"OK\0"
    assert d.priv.req(Op.WRITE, b"/secret/deeper\0hidden") == b"OK\0"
    # The readable node's event is the next one: nothing about /secret leaked before it.
    assert sync_event(g, d.priv, b"/open/x") == b"/open/x\0tok\0"


def test_xsa_115b_special_watches_need_permission(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    assert d.priv.req(Op.WRITE, b"/open\0") == b"OK\0"
    assert d.priv.req(Op.SET_PERMS, b"/open\0r1\0") == b"OK\0"
    assert g.req(Op.WATCH, b"/open\0sync\0") == b"OK\0"
    assert g.event() == b"/open\0sync\0"
    for special in (b"@introduceDomain", b"@releaseDomain"):
        assert g.req(Op.WATCH, special + b"\0sp\0") == b"OK\0"
        assert g.event() == special + b"\0sp\0"  # the initial event is unconditional
    assert d.priv.req(Op.INTRODUCE, b"7\x001\x001\0") == b"OK\0"
    assert d.priv.req(Op.RELEASE, b"7\0") == b"OK\0"
    assert sync_event(g, d.priv, b"/open/x") == b"/open/x\0sync\0"
    # Once dom0 grants read on the special node the guest does get it.
    assert d.priv.req(Op.SET_PERMS, b"@introduceDomain\0n0\0r1\0") == b"OK\0"
    assert d.priv.req(Op.INTRODUCE, b"8\x001\x001\0") == b"OK\0"
    assert g.event() == b"@introduceDomain\0sp\0"


def test_xsa_115c_is_domain_introduced_is_privileged(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    assert g.req(Op.IS_DOMAIN_INTRODUCED, b"2\0") == "EACCES"
    assert d.priv.req(Op.IS_DOMAIN_INTRODUCED, b"2\0") == b"T\0"
    assert any(r["op"] == "IS_DOMAIN_INTRODUCED" and r["domid"] == 1 for r in audit_denied(d))


def test_xsa_115d_watch_and_unwatch_ignore_bogus_tx_id(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    assert g.req(Op.WATCH, b"/x\0t\0", tx=0xDEAD) == b"OK\0"
    assert g.event() == b"/x\0t\0"
    assert g.req(Op.UNWATCH, b"/x\0t\0", tx=0xBEEF) == b"OK\0"
    assert g.req(Op.UNWATCH, b"/x\0t\0") == "ENOENT"


def test_xsa_115e_rm_of_subtree_fires_each_watch_once(xsd: Start) -> None:
    d = xsd()
    w = d.conn()
    for path in (b"/a/b/c", b"/a/b/d", b"/a/e"):
        assert d.priv.req(Op.WRITE, path + b"\0") == b"OK\0"
    for path, tok in ((b"/a", b"top"), (b"/a/b", b"mid"), (b"/a/b/c", b"leaf"), (b"/", b"root")):
        assert w.req(Op.WATCH, path + b"\0" + tok + b"\0") == b"OK\0"
        w.event()
    assert d.priv.req(Op.RM, b"/a\0") == b"OK\0"
    assert d.priv.req(Op.WRITE, b"/sync\0") == b"OK\0"
    events = []
    while True:
        ev = w.event()
        if ev.startswith(b"/sync"):
            break
        events.append(ev)
    tokens = sorted(ev.split(b"\0")[1] for ev in events)
    assert tokens == [b"leaf", b"mid", b"root", b"top"]


def test_xsa_115f_watcher_losing_access_sees_the_set_perms(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    assert d.priv.req(Op.WRITE, b"/n\0") == b"OK\0"
    assert d.priv.req(Op.SET_PERMS, b"/n\0n0\0r1\0") == b"OK\0"
    assert g.req(Op.WATCH, b"/n\0t\0") == b"OK\0"
    assert g.event() == b"/n\0t\0"
    assert d.priv.req(Op.SET_PERMS, b"/n\0n0\0") == b"OK\0"
    assert g.event() == b"/n\0t\0"
    assert g.req(Op.READ, b"/n\0") == "EACCES"


# -- XSA-233: a domain and its stub domain die together ------------------------------------------


def test_xsa_233_stubdom_and_target_released_together(xsd: Start) -> None:
    d = xsd()
    for domid in (3, 4):
        assert d.priv.req(Op.INTRODUCE, b"%d\x001\x001\0" % domid) == b"OK\0"
    # Stub domain first, then its target; and target first, then its stub domain (the
    # second order, with a repeated RELEASE, is the use-after-free of the oracle README).
    for stub, target, order in ((1, 2, (1, 2)), (3, 4, (4, 3))):
        assert d.priv.req(Op.SET_TARGET, b"%d\0%d\0" % (stub, target)) == b"OK\0"
        stub_conn = d.guest(stub)
        assert stub_conn.req(Op.GET_DOMAIN_PATH, b"%d\0" % stub) == b"/local/domain/%d\0" % stub
        for domid in order:
            assert d.priv.req(Op.RELEASE, b"%d\0" % domid) == b"OK\0"
            assert d.priv.req(Op.RELEASE, b"%d\0" % domid) == "ENOENT"
            assert d.priv.req(Op.IS_DOMAIN_INTRODUCED, b"%d\0" % domid) == b"F\0"
    alive(d)


# -- XSA-272 / XSA-414 / XSA-415: the node quota ----------------------------------------------------


def test_xsa_272_guest_cannot_exceed_node_quota(xsd: Start) -> None:
    d = xsd("-E", "20")
    home(d.priv, 1)
    g = d.guest(1)
    created = 1  # its home
    for i in range(40):
        r = g.req(Op.WRITE, b"n%d\0" % i)
        if r == "ENOSPC":
            break
        assert r == b"OK\0"
        created += 1
    assert created == 20  # C 4.17: ENOSPC once the count reaches the quota
    assert usage(d.priv, 1)["nodes"] == 20
    assert g.req(Op.MKDIR, b"more\0") == "ENOSPC"


def test_xsa_414_deep_create_at_quota_leaves_no_partial_nodes(xsd: Start) -> None:
    d = xsd("-E", "5")
    home(d.priv, 1)
    g = d.guest(1)
    for i in range(3):
        assert g.req(Op.WRITE, b"n%d\0" % i) == b"OK\0"
    before = walk(d.priv)
    assert usage(d.priv, 1)["nodes"] == 4
    deep = b"/".join(b"d%d" % i for i in range(30))
    assert g.req(Op.WRITE, deep + b"\0x") == "ENOSPC"
    assert walk(d.priv) == before
    assert usage(d.priv, 1)["nodes"] == 4
    alive(d)


def test_xsa_415_failed_create_in_transaction_fails_commit(xsd: Start) -> None:
    d = xsd("-E", "5")
    home(d.priv, 1)
    g = d.guest(1)
    before = walk(d.priv)
    tx = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    deep = b"/".join(b"d%d" % i for i in range(30))
    assert g.req(Op.WRITE, deep + b"\0x", tx=tx) == "ENOSPC"
    assert g.req(Op.TRANSACTION_END, b"T\0", tx=tx) == "ENOMEM"
    assert walk(d.priv) == before
    assert usage(d.priv, 1)["nodes"] == 1
    alive(d)


# -- XSA-322 / XSA-417: a re-used domid inherits nothing -------------------------------------------


def test_xsa_322_reintroduced_domid_inherits_no_acl(xsd: Start) -> None:
    d = xsd()
    assert d.priv.req(Op.WRITE, b"/shared\0data") == b"OK\0"
    assert d.priv.req(Op.SET_PERMS, b"/shared\0n0\0r2\0b1\0") == b"OK\0"
    assert d.guest(2).req(Op.READ, b"/shared\0") == b"data"
    assert d.priv.req(Op.RELEASE, b"2\0") == b"OK\0"
    # 4.17 keeps the entry listed, ignored from now on (C domain_adjust_node_perms())
    assert d.priv.req(Op.GET_PERMS, b"/shared\0") == b"n0\0r2\0b1\0"
    assert d.priv.req(Op.INTRODUCE, b"2\x001\x001\0") == b"OK\0"
    assert d.guest(2).req(Op.READ, b"/shared\0") == "EACCES"
    assert d.guest(1).req(Op.READ, b"/shared\0") == b"data"


def test_xsa_417_new_domain_gets_no_access_to_a_dead_domains_nodes(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 2)
    g = d.guest(2)
    assert g.req(Op.WRITE, b"mine\0secret") == b"OK\0"
    assert g.req(Op.SET_PERMS, b"mine\0n2\0r1\0") == b"OK\0"
    assert d.priv.req(Op.RELEASE, b"2\0") == b"OK\0"
    # The new domain 2 exists before anything of it is written again.
    assert d.priv.req(Op.INTRODUCE, b"2\x001\x001\0") == b"OK\0"
    g2 = d.guest(2)
    assert g2.req(Op.READ, b"/local/domain/2/mine\0") in ("ENOENT", "EACCES")
    assert d.priv.req(Op.READ, b"/local/domain/2/mine\0") == "ENOENT"
    assert usage(d.priv, 2)["nodes"] == 0
    alive(d)


# -- XSA-323: path lengths -----------------------------------------------------------------------


def test_xsa_323_every_creatable_path_is_readable_and_listable(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 1)
    g = d.guest(1)
    # The path-max quota (2048) counts the part after /local/domain/<domid>/.
    rel = b"/".join([b"p" * 200] * 10) + b"/" + b"q" * 38
    assert len(rel) == 2048
    assert g.req(Op.WRITE, rel + b"\0v") == b"OK\0"
    assert g.req(Op.WRITE, rel + b"x\0v") == "EINVAL"
    absolute = b"/local/domain/1/" + rel
    assert g.req(Op.READ, rel + b"\0") == b"v"
    assert g.req(Op.READ, absolute + b"\0") == b"v"
    assert d.priv.req(Op.READ, absolute + b"\0") == b"v"
    parent = absolute.rsplit(b"/", 1)[0]
    assert d.priv.req(Op.DIRECTORY, parent + b"\0") == b"q" * 38 + b"\0"
    assert absolute in walk(d.priv)
    assert absolute in walk(g, b"/local/domain/1")


# -- XSA-324: an event longer than the payload limit ----------------------------------------------


def test_xsa_324_oversized_watch_event_is_dropped(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 1)
    g = d.guest(1)
    token = b"t" * 3000
    assert g.req(Op.WATCH, b"/local/domain/1\0" + token + b"\0") == b"OK\0"
    assert g.event() == b"/local/domain/1\0" + token + b"\0"
    long_name = b"n" * 1200
    assert g.req(Op.WRITE, long_name + b"\0x") == b"OK\0"  # its event would be > 4096 bytes
    assert g.req(Op.WRITE, b"short\0x") == b"OK\0"
    assert g.event() == b"/local/domain/1/short\0" + token + b"\0"
    alive(d)


# -- XSA-325: a dropped misbehaving connection does not disturb cleanup ------------------------


def test_xsa_325_release_fires_after_misbehaving_connection_dropped(xsd: Start) -> None:
    d = xsd()
    w = d.conn()
    assert w.req(Op.WATCH, b"@releaseDomain\0rel\0") == b"OK\0"
    assert w.event() == b"@releaseDomain\0rel\0"
    g = d.guest(1)
    g.sock.sendall(struct.pack("=IIII", Op.READ, 1, 0, 1 << 20))  # over 4096: dropped
    with pytest.raises((ConnectionError, OSError)):
        g.recv_msg()
    assert d.priv.req(Op.IS_DOMAIN_INTRODUCED, b"1\0") == b"T\0"
    assert d.guest(1).req(Op.WRITE, b"/x\0") == "EACCES"  # the domain still works
    assert d.priv.req(Op.RELEASE, b"1\0") == b"OK\0"
    assert w.event() == b"@releaseDomain\0rel\0"
    assert d.priv.req(Op.IS_DOMAIN_INTRODUCED, b"1\0") == b"F\0"


# -- XSA-326: bounded resources -------------------------------------------------------------------


def test_xsa_326_transaction_nodes_quota(xsd: Start) -> None:
    d = xsd("-Q", "transaction-nodes=10")
    home(d.priv, 1)
    g = d.guest(1)
    tx = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    results = [g.req(Op.WRITE, b"n%d\0" % i, tx=tx) for i in range(20)]
    assert "ENOSPC" in results
    assert results[: results.index("ENOSPC")] == [b"OK\0"] * results.index("ENOSPC")
    assert g.req(Op.TRANSACTION_END, b"T\0", tx=tx) == "ENOMEM"
    assert d.priv.req(Op.DIRECTORY, b"/local/domain/1\0") == b""
    # dom0 is exempt.
    tx = int(d.priv.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    for i in range(20):
        assert d.priv.req(Op.WRITE, b"/p/n%d\0" % i, tx=tx) == b"OK\0"
    assert d.priv.req(Op.TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"


def test_xsa_326_transactions_and_watches_are_bounded_per_domain(xsd: Start) -> None:
    d = xsd("-t", "3", "-W", "5")
    g = d.guest(1)
    starts = [g.req(Op.TRANSACTION_START, b"\0") for _ in range(6)]
    assert "ENOSPC" in starts
    assert sum(isinstance(s, bytes) for s in starts) <= 4  # C 4.17: count > quota fails
    watches = [g.req(Op.WATCH, b"/w%d\0t\0" % i) for i in range(10)]
    assert "E2BIG" in watches
    assert sum(w == b"OK\0" for w in watches) <= 6


# -- XSA-330: RESET_WATCHES frees the watches --------------------------------------------------


def test_xsa_330_reset_watches_frees_quota(xsd: Start) -> None:
    d = xsd("-W", "100")
    g = d.guest(1)
    for _ in range(20):
        for i in range(100):
            assert g.req(Op.WATCH, b"/w%d\0tok\0" % i) == b"OK\0"
        assert g.req(Op.RESET_WATCHES) == b"OK\0"
        g.events.clear()
        assert usage(d.priv, 1)["watches"] == 0


# -- XSA-352 / XSA-353: ownership and the root ----------------------------------------------------


def test_xsa_352_unprivileged_owner_cannot_give_node_away(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 1)
    g = d.guest(1)
    assert g.req(Op.WRITE, b"mine\0") == b"OK\0"
    assert g.req(Op.SET_PERMS, b"mine\0n2\0") == "EPERM"
    assert g.req(Op.SET_PERMS, b"mine\0n0\0") == "EPERM"
    assert d.priv.req(Op.GET_PERMS, b"/local/domain/1/mine\0") == b"n1\0"
    assert g.req(Op.SET_PERMS, b"mine\0n1\0r2\0") == b"OK\0"  # the ACL it may change
    assert usage(d.priv, 2)["nodes"] == 0
    assert any(r["result"] == "EPERM" and r["op"] == "SET_PERMS" for r in audit_denied(d))


def test_xsa_353_guest_gets_eacces_on_root(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    requests = [
        (Op.DIRECTORY, b"/\0"),
        (Op.GET_PERMS, b"/\0"),
        (Op.SET_PERMS, b"/\0n1\0"),
        (Op.RM, b"/\0"),
        (Op.WRITE, b"/\0x"),
        (Op.MKDIR, b"/\0"),
        (Op.READ, b"/\0"),
        (Op.WRITE, b"/new\0x"),
    ]
    for op, payload in requests:
        assert g.req(op, payload) == "EACCES", (op, payload)
    assert d.priv.req(Op.GET_PERMS, b"/\0") == b"n0\0"
    assert d.priv.req(Op.READ, b"/new\0") == "ENOENT"
    denied = audit_denied(d)
    for op, _ in requests:
        assert any(r["op"] == op.name and r["domid"] == 1 for r in denied), op


# -- XSA-418: no recursion per tree level ---------------------------------------------------------


def test_xsa_418_thousand_level_tree(xsd: Start) -> None:
    d = xsd()
    deep = b"/a" * 1000  # 2000 bytes, within path-max
    assert d.priv.req(Op.WRITE, deep + b"\0bottom") == b"OK\0"
    assert d.priv.req(Op.READ, deep + b"\0") == b"bottom"
    assert len(walk(d.priv, b"/a")) == 1000
    assert d.priv.req(Op.CONTROL, b"check\0") == b"OK\0"
    assert d.priv.req(Op.RM, b"/a\0") == b"OK\0"
    assert d.priv.req(Op.DIRECTORY, b"/\0") == b"tool\0"
    # A guest's deep tree is deleted on release without recursion too.
    home(d.priv, 1)
    g = d.guest(1)
    limited = b"/".join([b"a"] * 900)
    assert g.req(Op.WRITE, limited + b"\0x") == b"OK\0"
    assert d.priv.req(Op.RELEASE, b"1\0") == b"OK\0"
    assert d.priv.req(Op.READ, b"/local/domain/1\0") == "ENOENT"
    alive(d)


# -- XSA-419 / XSA-483: a released domain's nodes and counts go --------------------------------


def test_xsa_419_nodes_outside_home_deleted_on_release(xsd: Start) -> None:
    d = xsd()
    assert d.priv.req(Op.WRITE, b"/shared\0") == b"OK\0"
    assert d.priv.req(Op.SET_PERMS, b"/shared\0n0\0b1\0") == b"OK\0"
    g = d.guest(1)
    for i in range(10):
        assert g.req(Op.WRITE, b"/shared/g%d\0x" % i) == b"OK\0"
    assert d.priv.req(Op.GET_PERMS, b"/shared/g0\0") == b"n1\0b1\0"
    assert d.priv.req(Op.RELEASE, b"1\0") == b"OK\0"
    assert d.priv.req(Op.DIRECTORY, b"/shared\0") == b""
    # 4.17 keeps the entry listed but ignored (C domain_adjust_node_perms(), XSA-322)
    assert d.priv.req(Op.GET_PERMS, b"/shared\0") == b"n0\0b1\0"


def test_xsa_483_reused_domid_gets_a_full_node_quota(xsd: Start) -> None:
    d = xsd("-E", "10")
    for _ in range(2):
        home(d.priv, 1)
        g = d.guest(1)
        made = 0
        while g.req(Op.WRITE, b"n%d\0" % made) == b"OK\0":
            made += 1
        assert made == 9  # plus the home node: the full quota of 10
        assert d.priv.req(Op.RELEASE, b"1\0") == b"OK\0"
        assert d.priv.req(Op.INTRODUCE, b"1\x001\x001\0") == b"OK\0"
        assert usage(d.priv, 1)["nodes"] == 0


# -- XSA-420: header lengths ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [4097, 1 << 31, 0xFFFFFFFF])
def test_xsa_420_huge_length_drops_only_that_connection(xsd: Start, length: int) -> None:
    d = xsd()
    for bad in (d.conn(), d.guest(1)):
        bad.sock.sendall(struct.pack("=IIII", Op.WRITE, 1, 0, length) + b"/x\0y")
        with pytest.raises((ConnectionError, OSError)):
            bad.recv_msg()
    assert d.guest(1).req(Op.GET_DOMAIN_PATH, b"1\0") == b"/local/domain/1\0"
    alive(d)


# -- XSA-421 / XSA-440: transactions ---------------------------------------------------------------


def test_xsa_421_create_and_delete_in_transaction_keeps_accounting(xsd: Start) -> None:
    d = xsd("-E", "5")
    home(d.priv, 1)
    g = d.guest(1)
    for _ in range(20):
        tx = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        assert g.req(Op.WRITE, b"tmp/a/b\0x", tx=tx) == b"OK\0"
        assert g.req(Op.RM, b"tmp\0", tx=tx) == b"OK\0"
        assert g.req(Op.TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"
    assert usage(d.priv, 1)["nodes"] == 1
    # A write that failed on a quota inside a transaction fails its commit.
    tx = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert g.req(Op.WRITE, b"ok\0x", tx=tx) == b"OK\0"
    assert g.req(Op.WRITE, b"big\0" + b"x" * 3000, tx=tx) == "ENOSPC"
    assert g.req(Op.TRANSACTION_END, b"T\0", tx=tx) == "ENOMEM"
    assert g.req(Op.READ, b"ok\0") == "ENOENT"
    assert usage(d.priv, 1)["nodes"] == 1


def test_xsa_440_conflicting_deletes_of_many_nodes(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 1)
    g = d.guest(1)
    for i in range(50):
        assert g.req(Op.WRITE, b"n%d\0x" % i) == b"OK\0"
    t1 = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    t2 = int(g.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    for tx in (t1, t2):
        for i in range(50):
            assert g.req(Op.RM, b"n%d\0" % i, tx=tx) == b"OK\0"
    assert g.req(Op.TRANSACTION_END, b"T\0", tx=t1) == b"OK\0"
    assert g.req(Op.TRANSACTION_END, b"T\0", tx=t2) == "EAGAIN"
    assert d.priv.req(Op.DIRECTORY, b"/local/domain/1\0") == b""
    assert usage(d.priv, 1)["nodes"] == 1
    alive(d)


# -- XSA-481: "/local/domain/" ------------------------------------------------------------------


def test_xsa_481_trailing_slash_domain_path_is_einval(xsd: Start) -> None:
    d = xsd()
    g = d.guest(1)
    for conn in (d.priv, g):
        for op in (Op.READ, Op.WRITE, Op.MKDIR, Op.RM, Op.DIRECTORY, Op.GET_PERMS):
            assert conn.req(op, b"/local/domain/\0") == "EINVAL", op
        assert conn.req(Op.SET_PERMS, b"/local/domain/\0n0\0") == "EINVAL"
        assert conn.req(Op.WATCH, b"/local/domain/\0t\0") == "EINVAL"
    alive(d)


# -- XSA-484: RESET_WATCHES inside a transaction --------------------------------------------------


def test_xsa_484_reset_watches_with_tx_id(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 1)
    for conn in (d.guest(1), d.conn()):
        tx = int(conn.req(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        assert conn.req(Op.WRITE, b"/local/domain/1/t\0x", tx=tx) == b"OK\0"
        assert conn.req(Op.RESET_WATCHES, b"", tx=tx) == b"OK\0"
        assert conn.req(Op.READ, b"/local/domain/1/t\0", tx=tx) == "ENOENT"
        assert conn.req(Op.TRANSACTION_END, b"T\0", tx=tx) == "ENOENT"
    assert d.priv.req(Op.READ, b"/local/domain/1/t\0") == "ENOENT"
    alive(d)


# -- Sockets and the audit log ------------------------------------------------------------------


def test_sockets_are_private_to_the_daemon_user(xsd: Start) -> None:
    d = xsd()
    d.guest(1)
    daemon_uid = os.stat(f"/proc/{d.proc.pid}").st_uid
    paths = [d.socket, d.rundir / "domains" / "1.sock", d.rundir / "domains" / "2.sock"]
    for path in paths:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, path
        assert st.st_uid == daemon_uid
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))


def test_audit_log_records_every_denied_request(xsd: Start) -> None:
    d = xsd()
    home(d.priv, 2)
    g = d.guest(1)
    denied = [
        (Op.READ, b"/local/domain/2\0", "EACCES"),
        (Op.WRITE, b"/local/domain/2/x\0v", "EACCES"),
        (Op.INTRODUCE, b"9\x001\x001\0", "EACCES"),
        (Op.RELEASE, b"2\0", "EACCES"),
        (Op.SET_TARGET, b"1\x002\0", "EACCES"),
        (Op.CONTROL, b"check\0", "EACCES"),
        (Op.GET_PERMS, b"/tool\0", "EACCES"),
    ]
    for op, payload, errno in denied:
        assert g.req(op, payload) == errno, op
    home(d.priv, 1)
    assert g.req(Op.WRITE, b"mine\0") == b"OK\0"
    assert g.req(Op.SET_PERMS, b"mine\0n2\0") == "EPERM"
    records = audit_denied(d)
    mine = [r for r in records if r["domid"] == 1]
    assert [(r["op"], r["result"]) for r in mine] == [
        *((op.name, errno) for op, _, errno in denied),
        ("SET_PERMS", "EPERM"),
    ]
    assert all(r["guest"] for r in mine)

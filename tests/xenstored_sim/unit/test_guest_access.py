"""Unprivileged guests, as C xenstored 4.17.7 answered them through the oracle's guest
sockets (oracle/guests): permissions, EACCES vs ENOENT, SET_TARGET, RELEASE clean-up."""

from __future__ import annotations

import pytest

from xenstored_sim.wire import Op

GUEST = 5


@pytest.fixture
def setup(h):
    """dom0 socket P, guest 5 with /local/domain/5 owned by it, /local/domain/5/ro n0."""
    p = h.socket()
    h.introduce(p, GUEST)
    g = h.guest(GUEST)
    assert h.req(p, Op.MKDIR, b"/local/domain/5\0") == b"OK\0"
    assert h.req(p, Op.SET_PERMS, b"/local/domain/5\0n5\0") == b"OK\0"
    assert h.req(p, Op.WRITE, b"/local/domain/5/ro\0v") == b"OK\0"
    assert h.req(p, Op.SET_PERMS, b"/local/domain/5/ro\0n0\0") == b"OK\0"
    return h, p, g


# (perms of /local/domain/5/ro or None to keep n0, op, payload, C's answer)
CASES = [
    (None, Op.READ, b"/\0", "EACCES"),
    (None, Op.DIRECTORY, b"/\0", "EACCES"),
    (None, Op.GET_PERMS, b"/\0", "EACCES"),
    (None, Op.MKDIR, b"/\0", "EACCES"),
    (None, Op.RM, b"/\0", "EACCES"),
    (None, Op.READ, b"/nonexist\0", "EACCES"),
    (None, Op.READ, b"/tool/nonexist\0", "EACCES"),
    (None, Op.WRITE, b"/tool/x\0v", "EACCES"),
    (None, Op.WRITE, b"x\0v", b"OK\0"),
    (None, Op.READ, b"ro\0", "EACCES"),
    (None, Op.READ, b"ro/sub\0", "EACCES"),
    (None, Op.WRITE, b"ro/sub\0x", "EACCES"),
    (None, Op.MKDIR, b"ro\0", "EACCES"),
    (None, Op.RM, b"ro\0", "EACCES"),
    (None, Op.RM, b"ro/sub\0", "EACCES"),
    (None, Op.DIRECTORY, b"ro\0", "EACCES"),
    (None, Op.GET_PERMS, b"ro\0", "EACCES"),
    (None, Op.SET_PERMS, b"ro\0n5\0", "EACCES"),
    (b"n0\0r5\0", Op.READ, b"ro/sub\0", "ENOENT"),
    (b"n0\0r5\0", Op.READ, b"ro\0", b"v"),
    (b"n0\0r5\0", Op.WRITE, b"ro/sub\0x", "EACCES"),
    (b"n0\0r5\0", Op.MKDIR, b"ro\0", "EACCES"),
    (b"n0\0r5\0", Op.RM, b"ro/sub\0", "EACCES"),
    (b"n0\0w5\0", Op.READ, b"ro\0", "EACCES"),
    (b"n0\0w5\0", Op.READ, b"ro/sub\0", "EACCES"),
    (b"n0\0w5\0", Op.WRITE, b"ro/sub\0x", b"OK\0"),
    (b"n0\0w5\0", Op.MKDIR, b"ro\0", b"OK\0"),
    (b"n0\0w5\0", Op.RM, b"ro/none\0", b"OK\0"),
    (b"n0\0w5\0", Op.RM, b"ro/none/deeper\0", "ENOENT"),
    (b"b0\0", Op.READ, b"ro\0", b"v"),
    (b"b0\0", Op.WRITE, b"ro\0v", b"OK\0"),
    (b"b0\0", Op.SET_PERMS, b"ro\0b0\0", "EACCES"),
    (None, Op.IS_DOMAIN_INTRODUCED, b"5\0", "EACCES"),
    (None, Op.INTRODUCE, b"6\x001\x001\0", "EACCES"),
    (None, Op.CONTROL, b"print\0x\0", "EACCES"),
    (None, Op.RELEASE, b"5\0", "EACCES"),
    (None, Op.GET_DOMAIN_PATH, b"5\0", b"/local/domain/5\0"),
    (None, Op.RESET_WATCHES, b"", b"OK\0"),
    (None, Op.SET_PERMS, b"@releaseDomain\0n5\0", "EINVAL"),
    (None, Op.GET_PERMS, b"@releaseDomain\0", "EINVAL"),
]


@pytest.mark.parametrize(("perms", "op", "payload", "expected"), CASES)
def test_guest_request(setup, perms, op, payload, expected) -> None:
    h, p, g = setup
    if perms is not None:
        assert h.req(p, Op.SET_PERMS, b"/local/domain/5/ro\0" + perms) == b"OK\0"
    assert h.req(g, op, payload) == expected


def test_creator_owns_and_acl_is_copied(setup) -> None:
    h, p, g = setup
    h.req(p, Op.SET_PERMS, b"/local/domain/5/ro\0n0\0w5\0")
    assert h.req(g, Op.WRITE, b"ro/sub\0x") == b"OK\0"
    assert h.req(g, Op.GET_PERMS, b"ro/sub\0") == b"n5\0w5\0"
    # dom0 creating under a guest's node: the parent's list exactly, owner included
    assert h.req(p, Op.WRITE, b"/local/domain/5/byp/q\0x") == b"OK\0"
    assert h.req(p, Op.GET_PERMS, b"/local/domain/5/byp/q\0") == b"n5\0"


def test_owner_may_not_give_node_away_and_perm_quota(setup) -> None:
    h, p, g = setup
    assert h.req(g, Op.WRITE, b"x\0v") == b"OK\0"
    assert h.req(g, Op.SET_PERMS, b"x\0n0\0") == "EPERM"
    assert h.req(g, Op.SET_PERMS, b"x\0n5\0r0\0") == b"OK\0"
    assert h.req(g, Op.SET_PERMS, b"x\0n5\0r1\0r2\0r3\0r4\0") == b"OK\0"
    assert h.req(g, Op.SET_PERMS, b"x\0n5\0r1\0r2\0r3\0r4\0r6\0") == "ENOSPC"
    assert h.req(p, Op.SET_PERMS, b"/local/domain/5/x\0n5\0r1\0r2\0r3\0r4\0r6\0r7\0") == b"OK\0"


def test_set_target(h) -> None:
    p = h.socket()
    for d in (6, 9):
        h.introduce(p, d)
    t = h.guest(9)
    h.req(p, Op.WRITE, b"/local/domain/6/tgt\0v")
    h.req(p, Op.SET_PERMS, b"/local/domain/6/tgt\0n6\0")
    h.req(p, Op.WRITE, b"/local/domain/6/acl\0v")
    h.req(p, Op.SET_PERMS, b"/local/domain/6/acl\0n0\0r6\0")
    assert h.req(t, Op.READ, b"/local/domain/6/tgt\0") == "EACCES"
    assert h.req(t, Op.READ, b"/local/domain/6/acl\0") == "EACCES"
    assert h.req(p, Op.SET_TARGET, b"9\x006\0") == b"OK\0"
    assert h.req(t, Op.READ, b"/local/domain/6/tgt\0") == b"v"
    assert h.req(t, Op.WRITE, b"/local/domain/6/tgt/new\0x") == b"OK\0"
    assert h.req(t, Op.GET_PERMS, b"/local/domain/6/tgt/new\0") == b"n9\0"
    assert h.req(t, Op.SET_PERMS, b"/local/domain/6/tgt\0n6\0r9\0") == b"OK\0"
    assert h.req(t, Op.SET_PERMS, b"/local/domain/6/tgt\0n9\0") == "EPERM"
    assert h.req(t, Op.READ, b"/local/domain/6/acl\0") == b"v"
    assert h.req(t, Op.WRITE, b"/local/domain/6/acl\0x") == "EACCES"
    assert h.req(t, Op.IS_DOMAIN_INTRODUCED, b"6\0") == "EACCES"
    assert h.req(p, Op.SET_TARGET, b"9\x0077\0") == "ENOENT"
    assert h.req(p, Op.SET_TARGET, b"77\x006\0") == "ENOENT"
    assert h.req(p, Op.SET_TARGET, b"9\0") == "EINVAL"
    rec = [r for r in h.engine.take_audit() if r["op"] == "READ" and r["conn"] == t]
    assert [r["rule"] for r in rec] == [
        "default:n",
        "default:n",
        "target-owner",
        "acl:r6",
    ]


def test_release_deletes_owned_nodes_ignores_acls_and_fires(h) -> None:
    p = h.socket()
    h.introduce(p, 6)
    h.introduce(p, 9)
    t = h.guest(9)
    h.req(p, Op.WRITE, b"/local/domain/6/tgt\0v")
    h.req(p, Op.SET_PERMS, b"/local/domain/6/tgt\0n6\0r9\0")
    h.req(p, Op.WRITE, b"/local/domain/6/acl\0v")
    h.req(p, Op.SET_PERMS, b"/local/domain/6/acl\0n0\0r9\0")
    h.req(p, Op.SET_TARGET, b"9\x006\0")
    assert h.req(t, Op.WRITE, b"/local/domain/6/tgt/new\0x") == b"OK\0"
    for w in (b"/local/domain/9\0w9\0", b"/pub\0pub\0", b"@releaseDomain\0rel\0"):
        h.out(p, Op.WATCH, w)
    h.req(p, Op.MKDIR, b"/local/domain/9\0")
    h.req(p, Op.SET_PERMS, b"/local/domain/9\0n9\0")
    assert h.req(t, Op.WRITE, b"x/y\0v") == b"OK\0"
    h.req(p, Op.WRITE, b"/pub/k\0v")
    h.req(p, Op.SET_PERMS, b"/pub/k\0n0\0b9\0")
    h.req(p, Op.SET_PERMS, b"/pub\0n9\0")
    out = h.out(p, Op.RELEASE, b"9\0")
    # C: the removed nodes' watches, then @releaseDomain, then the reply
    assert out == [
        (p, "WATCH_EVENT", b"/local/domain/9\0w9\0"),
        (p, "WATCH_EVENT", b"/pub\0pub\0"),
        (p, "WATCH_EVENT", b"@releaseDomain\0rel\0"),
        (p, "RELEASE", b"OK\0"),
    ]
    assert not h.engine.is_connected(t)
    assert h.req(p, Op.READ, b"/local/domain/6/tgt/new\0") == "ENOENT"
    assert h.req(p, Op.READ, b"/pub/k\0") == "ENOENT"
    # XSA-322 as 4.17 does it (C domain_adjust_node_perms()): the released domain's entries
    # stay listed, but a domain introduced again with that id gets nothing from them.
    assert h.req(p, Op.GET_PERMS, b"/local/domain/6/tgt\0") == b"n6\0r9\0"
    assert h.req(p, Op.GET_PERMS, b"/local/domain/6/acl\0") == b"n0\0r9\0"
    h.introduce(p, 9)
    again = h.guest(9)
    assert h.req(again, Op.READ, b"/local/domain/6/acl\0") == "EACCES"
    h.req(p, Op.WRITE, b"/local/domain/6/acl/kid\0v")
    assert h.req(p, Op.GET_PERMS, b"/local/domain/6/acl/kid\0") == b"n0\0r9\0"
    assert h.req(again, Op.READ, b"/local/domain/6/acl/kid\0") == "EACCES"
    # and a new domain 9 inherits nothing
    h.introduce(p, 9)
    t2 = h.guest(9)
    assert h.req(t2, Op.READ, b"/local/domain/6/acl\0") == "EACCES"
    assert h.req(t2, Op.READ, b"/local/domain/6/tgt\0") == "EACCES"


def test_watch_events_filtered_by_read_permission(h) -> None:
    p = h.socket()
    h.introduce(p, 6)
    g = h.guest(6)
    h.req(p, Op.MKDIR, b"/local/domain/6\0")
    h.req(p, Op.SET_PERMS, b"/local/domain/6\0n6\0")
    for w in (b"/\0root\0", b"@introduceDomain\0intro\0", b"@releaseDomain\0rel\0"):
        assert h.out(g, Op.WATCH, w)[-1][1] == "WATCH_EVENT"

    def seen(op, payload):
        return [m[2] for m in h.out(p, op, payload) if m[0] == g]

    root = b"\0root\0"
    assert seen(Op.WRITE, b"/local/domain/6/sec/x\0v") == [b"/local/domain/6/sec/x" + root]
    assert seen(Op.SET_PERMS, b"/local/domain/6/sec\0n0\0") == [b"/local/domain/6/sec" + root]
    assert seen(Op.SET_PERMS, b"/local/domain/6/sec/x\0n0\0") == [b"/local/domain/6/sec/x" + root]
    assert seen(Op.WRITE, b"/local/domain/6/sec/x\0v2") == []
    assert seen(Op.WRITE, b"/local/domain/6/sec/x/y\0v2") == []
    assert seen(Op.WRITE, b"/other/x\0v") == []
    assert seen(Op.SET_PERMS, b"/other\0n0\0r6\0") == [b"/other" + root]
    assert seen(Op.SET_PERMS, b"/other\0n0\0") == [b"/other" + root]  # old perms count
    assert seen(Op.WRITE, b"/other/x\0v") == []
    assert seen(Op.SET_PERMS, b"/other/x\0n0\0r6\0") == [b"/other/x" + root]
    assert seen(Op.RM, b"/other\0") == []
    assert seen(Op.INTRODUCE, b"8\x001\x001\0") == []
    assert seen(Op.RELEASE, b"8\0") == []
    assert h.req(p, Op.SET_PERMS, b"@introduceDomain\0n0\0r6\0") == b"OK\0"
    assert h.req(p, Op.SET_PERMS, b"@releaseDomain\0n0\0r6\0") == b"OK\0"
    assert h.req(p, Op.SET_PERMS, b"@bogus\0n0\0r6\0") == "EINVAL"
    assert seen(Op.INTRODUCE, b"8\x001\x001\0") == [b"@introduceDomain\0intro\0"]
    assert seen(Op.RELEASE, b"8\0") == [b"@releaseDomain\0rel\0"]
    h.out(g, Op.WATCH, b"/local/domain/6/sec/x\0exact\0")
    # the removed child's exact watch is unreadable; the top is readable through its parent
    assert seen(Op.RM, b"/local/domain/6/sec\0") == [b"/local/domain/6/sec" + root]
    # written under a readable parent but itself unreadable: delivered (parent rule)
    h.req(p, Op.WRITE, b"/local/domain/6/sec2\0v")
    h.req(p, Op.SET_PERMS, b"/local/domain/6/sec2\0n0\0")
    assert seen(Op.WRITE, b"/local/domain/6/sec2\0v") == [b"/local/domain/6/sec2" + root]

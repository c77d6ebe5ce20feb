"""Generations, RM events, transactions and deep trees (C 4.17.7 via the oracle)."""

from __future__ import annotations

import sys

from xenstored_sim.wire import Op


def gen(h, p, path: bytes) -> int:
    return int(h.req(p, Op.DIRECTORY_PART, path + b"\x000\0").split(b"\0")[0])


def test_generation_counter_matches_c(h) -> None:
    p = h.socket()
    assert gen(h, p, b"/") == 1 and gen(h, p, b"/tool/xenstored") == 3
    h.req(p, Op.WRITE, b"/a\0v")
    assert (gen(h, p, b"/a"), gen(h, p, b"/")) == (4, 5)
    h.req(p, Op.WRITE, b"/a\0v")
    assert gen(h, p, b"/a") == 6
    h.req(p, Op.WRITE, b"/a/b/c\0v")
    assert [gen(h, p, x) for x in (b"/a/b/c", b"/a/b", b"/a")] == [7, 8, 9]
    h.req(p, Op.SET_PERMS, b"/a/b/c\0n0\0")
    assert gen(h, p, b"/a/b/c") == 10
    h.req(p, Op.MKDIR, b"/a/b/c\0")
    h.req(p, Op.RM, b"/a/b/c\0")
    assert gen(h, p, b"/a/b") == 12
    h.req(p, Op.WRITE, b"/a/x\0v")
    h.req(p, Op.RM, b"/a\0")
    assert gen(h, p, b"/") == 20
    h.req(p, Op.WRITE, b"/q\0v")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(p, Op.WRITE, b"/q\0t", tx)
    assert gen(h, p, b"/q") == 21
    assert int(h.req(p, Op.DIRECTORY_PART, b"/q\x000\0", tx).split(b"\0")[0]) == 24
    h.req(p, Op.WRITE, b"/tq/a/b\0t", tx)
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx) == b"OK\0"
    assert [gen(h, p, x) for x in (b"/q", b"/tq/a/b", b"/tq/a", b"/tq", b"/")] == [
        29,
        30,
        31,
        32,
        33,
    ]


def test_rm_fires_descendants_post_order_then_top(h) -> None:
    p = h.socket()
    h.req(p, Op.WRITE, b"/x/a/b\0v")
    h.req(p, Op.WRITE, b"/x/c\0v")
    for w in (b"/x/a", b"/x/a/b", b"/x/c", b"/x"):
        h.out(p, Op.WATCH, w + b"\0t\0")
    assert h.out(p, Op.RM, b"/x\0") == [
        (p, "WATCH_EVENT", b"/x/a/b\0t\0"),
        (p, "WATCH_EVENT", b"/x/a\0t\0"),
        (p, "WATCH_EVENT", b"/x/c\0t\0"),
        (p, "WATCH_EVENT", b"/x\0t\0"),
        (p, "RM", b"OK\0"),
    ]


def test_transaction_conflicts_only_after_first_touch(h) -> None:
    p, o = h.socket(), h.socket()
    h.req(p, Op.WRITE, b"/t\0a")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(o, Op.WRITE, b"/t\0before-touch")  # not a conflict (docs/xenstore.md, 'Transactions')
    assert h.req(p, Op.READ, b"/t\0", tx) == b"before-touch"
    h.req(p, Op.WRITE, b"/t\0mine", tx)
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx) == b"OK\0"
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.READ, b"/t\0", tx) == b"mine"
    h.req(o, Op.WRITE, b"/t\0after-touch")
    assert h.req(p, Op.READ, b"/t\0", tx) == b"mine"  # its private copy
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    # unrelated writes elsewhere never conflict
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(p, Op.WRITE, b"/t\0again", tx)
    h.req(o, Op.WRITE, b"/elsewhere\0x")
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx) == b"OK\0"
    # XSA-440: two transactions deleting the same nodes
    for i in range(50):
        h.req(p, Op.WRITE, b"/many/n%d\0v" % i)
    t1 = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    t2 = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    for t in (t1, t2):
        assert h.req(p, Op.RM, b"/many\0", t) == b"OK\0"
    assert h.req(p, Op.TRANSACTION_END, b"T\0", t1) == b"OK\0"
    assert h.req(p, Op.TRANSACTION_END, b"T\0", t2) == "EAGAIN"
    assert h.engine.check() == []


def test_transaction_start_inside_transaction_is_ebusy(h) -> None:
    p = h.socket()
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.TRANSACTION_START, b"\0", tx) == "EBUSY"
    assert h.req(p, Op.RESET_WATCHES, b"", tx) == b"OK\0"  # XSA-484
    assert h.req(p, Op.READ, b"/\0", tx) == "ENOENT"


def test_thousand_level_tree_without_recursion(h) -> None:
    # XSA-418: deeper than CPython's recursion limit allows a recursive walk to go
    p = h.socket()
    depth = 1000
    assert depth >= sys.getrecursionlimit()
    path = b"/d" + b"/a" * (depth - 1)
    for i in range(1, depth + 1, 100):
        h.req(p, Op.MKDIR, b"/d" + b"/a" * i + b"\0")
    assert h.req(p, Op.WRITE, path + b"\0leaf") == b"OK\0"
    assert h.req(p, Op.READ, path + b"\0") == b"leaf"
    h.out(p, Op.WATCH, path + b"\0deep\0")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.RM, b"/d\0", tx) == b"OK\0"
    assert h.req(p, Op.TRANSACTION_END, b"F\0", tx) == b"OK\0"
    out = h.out(p, Op.RM, b"/d\0")
    assert out[0] == (p, "WATCH_EVENT", path + b"\0deep\0")
    assert h.req(p, Op.DIRECTORY, b"/\0") == b"tool\0"
    assert h.req(p, Op.CONTROL, b"check\0") == b"OK\0"


def test_oversized_replies_and_events(h) -> None:
    p = h.socket()
    for i in range(200):
        h.req(p, Op.MKDIR, b"/big/child-with-a-long-name-%03d\0" % i)
    assert h.req(p, Op.DIRECTORY, b"/big\0") == "E2BIG"  # XSA-72
    names: list[bytes] = []
    offset = 0
    while True:
        part = h.req(p, Op.DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert len(part) <= 4096
        chunk = part.split(b"\0", 1)[1]
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            names += [n for n in chunk.split(b"\0") if n]
            break
        names += [n for n in chunk.split(b"\0") if n]
        offset += len(chunk)
    assert len(names) == 200 and names[0] == b"child-with-a-long-name-000"
    token = b"t" * 4090
    out = h.out(p, Op.WATCH, b"/big\0" + token + b"\0")
    assert [m[1] for m in out] == ["WATCH", "WATCH_EVENT"]  # exactly 4096 bytes: fits
    # XSA-324: the event for /big/x would be 4098 bytes; it is dropped, nothing else breaks
    assert h.out(p, Op.WRITE, b"/big/x\0v") == [(p, "WRITE", b"OK\0")]
    assert [m[1] for m in h.out(p, Op.WRITE, b"/big\0v")] == ["WATCH_EVENT", "WRITE"]

"""Watch events queued for a guest that does not read (docs/xenstore.md, 'Watch events and the send
queue', XSA-326): identical unsent events are sent once, and events left unsent past the watch-event
timeout (``-w watch-event=N``) are discarded.

To keep events unsent, the guest pipelines READs of a 4000-byte node and reads nothing: the
kernel buffer fills, the daemon queues replies up to the ``outstanding`` quota and stops
reading the guest.  CONTROL ``quota <domid>`` shows that backlog as ``outstanding``.
"""

from __future__ import annotations

import struct
import time

from xenstored_sim.wire import Op

HEADER = struct.Struct("=IIII")

READS = 300
EVENT = b"/local/domain/5/w\0tok\0"


def outstanding(priv, domid: int) -> int:
    report = priv.req(Op.CONTROL, b"quota\x00%d\0" % domid)
    line = next(x for x in report.split(b"\n") if x.startswith(b"outstanding"))
    return int(line.split(b":")[1])


def backed_up_watcher(d):
    """dom0 and a guest watching /local/domain/5/w whose output queue is full."""
    p = d.conn()
    assert p.req(Op.INTRODUCE, b"5\x001\x001\0") == b"OK\0"
    assert p.req(Op.WRITE, b"/local/domain/5/big\0" + b"v" * 4000) == b"OK\0"
    assert p.req(Op.SET_PERMS, b"/local/domain/5\0n5\0") == b"OK\0"
    assert p.req(Op.SET_PERMS, b"/local/domain/5/big\0n5\0") == b"OK\0"
    g = d.guest(5)
    assert g.req(Op.WATCH, b"/local/domain/5/w\0tok\0") == b"OK\0"
    assert g.event() == EVENT
    # one send: the requests are small, the replies are not
    g.sock.sendall(b"".join(HEADER.pack(Op.READ, 100 + i, 0, 4) + b"big\0" for i in range(READS)))
    deadline = time.monotonic() + 5
    while outstanding(p, 5) < 20:
        assert time.monotonic() < deadline, "the guest's queue never filled"
        time.sleep(0.01)
    return p, g


def drain(g) -> list[bytes]:
    """Read every reply still due; return the events met on the way."""
    events: list[bytes] = []
    replies = 0
    while replies < READS:
        op, _, _, body = g.recv_msg()
        if op == Op.WATCH_EVENT:
            events.append(body)
        else:
            assert body == b"v" * 4000
            replies += 1
    return events


def test_identical_unsent_events_are_sent_once(start_daemon) -> None:
    d = start_daemon()
    p, g = backed_up_watcher(d)
    for value in (b"1", b"2", b"3", b"4"):
        assert p.req(Op.WRITE, b"/local/domain/5/w\0" + value) == b"OK\0"
    assert outstanding(p, 5) == 21  # 20 replies and a single event
    assert p.req(Op.WRITE, b"/local/domain/5/w/sub\0x") == b"OK\0"  # another path: queued
    assert drain(g) == [EVENT, b"/local/domain/5/w/sub\0tok\0"]
    # once sent, the same event is queued again
    assert p.req(Op.WRITE, b"/local/domain/5/w\x005") == b"OK\0"
    assert g.event() == EVENT


def test_unread_events_expire_after_the_watch_event_timeout(start_daemon) -> None:
    d = start_daemon("-w", "watch-event=1")
    p, g = backed_up_watcher(d)
    assert p.req(Op.WRITE, b"/local/domain/5/w\0gone") == b"OK\0"
    assert outstanding(p, 5) == 21
    deadline = time.monotonic() + 5
    while outstanding(p, 5) != 20:
        assert time.monotonic() < deadline, "the event never expired"
        time.sleep(0.05)
    assert drain(g) == []
    # a fresh event that the guest reads in time is delivered
    assert p.req(Op.WRITE, b"/local/domain/5/w\0kept") == b"OK\0"
    assert g.event() == EVENT


def test_events_wait_without_a_timeout_for_dom0_sockets(start_daemon) -> None:
    d = start_daemon("--timeout", "watch-event=1")
    p = d.conn()
    w = d.conn()
    assert w.req(Op.WATCH, b"/x\0t\0") == b"OK\0"
    assert w.event() == b"/x\0t\0"
    assert p.req(Op.WRITE, b"/x\0v") == b"OK\0"
    time.sleep(1.3)
    assert w.event() == b"/x\0t\0"


def test_events_to_a_reading_watcher_are_never_taken_for_duplicates(start_daemon) -> None:
    """C writes each connection's queue before it reads the next request, so a watcher whose
    kernel buffer has room gets every event, even when one writer changes the same node
    twice back to back: nothing is left unsent for the duplicate check to drop."""
    d = start_daemon()
    watcher, writer = d.conn(), d.conn()
    assert watcher.req(Op.WATCH, b"/w\0tok\0") == b"OK\0"
    assert watcher.event() == b"/w\0tok\0"
    rounds = 50
    for i in range(rounds):
        assert writer.req(Op.WRITE, b"/w\0%d" % i) == b"OK\0"
        assert writer.req(Op.RM, b"/w\0") == b"OK\0"
    assert [watcher.event() for _ in range(2 * rounds)] == [b"/w\0tok\0"] * (2 * rounds)


def test_identical_events_of_one_request_are_sent_once(start_daemon) -> None:
    """Two watches with one token, on a node and its parent: one WRITE fires both with the
    same path and token.  C queues every event of a request before writing any, so its
    duplicate check sends the pair once (core.c: send_event())."""
    d = start_daemon()
    watcher, writer = d.conn(), d.conn()
    assert watcher.req(Op.WATCH, b"/s\0t\0") == b"OK\0"
    assert watcher.req(Op.WATCH, b"/s/b/x\0t\0") == b"OK\0"
    assert [watcher.event(), watcher.event()] == [b"/s\0t\0", b"/s/b/x\0t\0"]
    assert writer.req(Op.WRITE, b"/s/b/x\0v") == b"OK\0"
    # The reply to a request sent after the write comes after every event of the write.
    assert watcher.req(Op.GET_DOMAIN_PATH, b"0\0") == b"/local/domain/0\0"
    assert watcher.events == [b"/s/b/x\0t\0"]

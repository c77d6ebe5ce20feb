"""The daemon's batched I/O over real sockets: many requests in one read, replies sent in
one go, output the kernel does not take at once, and events queued by other connections.

Functional checks only: every reply arrives, once, in order, and nobody waits on anybody.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from xenstored_sim.wire import Op

Start = Callable[..., Any]
HEADER = struct.Struct("=IIII")


def frame(op: int, req_id: int, payload: bytes) -> bytes:
    return HEADER.pack(op, req_id, 0, len(payload)) + payload


def test_pipelined_requests_are_answered_in_order(start_daemon: Start) -> None:
    d = start_daemon()
    c = d.conn()
    batch = []
    for i in range(1, 401):
        key = b"/pipe/k%d" % ((i + 1) // 2 % 7)  # each READ follows the WRITE of its key
        if i % 2:
            batch.append(frame(Op.WRITE, i, key + b"\0v%d" % i))
        else:
            batch.append(frame(Op.READ, i, key + b"\0"))
    c.sock.sendall(b"".join(batch))  # one send: the daemon reads many frames per wake-up
    for i in range(1, 401):
        op, req_id, _, body = c.recv_msg()
        assert req_id == i
        if i % 2:
            assert (op, body) == (Op.WRITE, b"OK\0")
        else:
            assert (op, body) == (Op.READ, b"v%d" % (i - 1))


def test_replies_beyond_the_socket_buffer_wait_for_the_reader(start_daemon: Start) -> None:
    d = start_daemon()
    slow = d.conn()
    other = d.conn()
    value = bytes(range(256)) * 15  # 3840 bytes: the replies fill the kernel many times
    assert slow.req(Op.WRITE, b"/big\0" + value) == b"OK\0"
    count = 1500  # more than the privileged backlog of unsent replies (1024)
    slow.sock.sendall(b"".join(frame(Op.READ, 1000 + i, b"/big\0") for i in range(count)))
    # The unread connection stalls alone: another client is served meanwhile.
    assert other.req(Op.WRITE, b"/other\0x") == b"OK\0"
    assert other.req(Op.READ, b"/other\0") == b"x"
    for i in range(count):
        op, req_id, _, body = slow.recv_msg()
        assert (op, req_id) == (Op.READ, 1000 + i)
        assert body == value
    assert slow.req(Op.READ, b"/other\0") == b"x"  # and it still works afterwards


def test_events_from_another_connections_batch_reach_the_watcher(start_daemon: Start) -> None:
    d = start_daemon()
    watcher = d.conn()
    writer = d.conn()
    assert watcher.req(Op.WATCH, b"/w\0tok\0") == b"OK\0"
    assert watcher.event() == b"/w\0tok\0"
    n = 200
    writer.sock.sendall(b"".join(frame(Op.WRITE, i + 1, b"/w/k%d\0x" % i) for i in range(n)))
    for i in range(n):
        assert writer.recv_msg()[1] == i + 1
    events = [watcher.event() for _ in range(n)]
    assert events == [b"/w/k%d\0tok\0" % i for i in range(n)]

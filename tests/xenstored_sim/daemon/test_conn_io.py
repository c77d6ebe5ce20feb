"""The main loop's socket work (xenstored_sim/server/conn_io.py) over a real socket pair and a
real engine, driven one round at a time: the fast lane answers exactly what the engine's
``handle`` answers, a client that does not read is held and then served in order, and a client
that hangs up still gets every queued byte."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from xenstored_sim.core import ConnKind, Outbox, XenstoreEngine
from xenstored_sim.core.outqueue import PRIVILEGED_OUTSTANDING, OutQueue
from xenstored_sim.server.conn_io import READ, ConnIO, Reactor
from xenstored_sim.wire import Op, Packet, encode

HEADER = struct.Struct("=IIII")


class Loop:
    """One engine connection served by a reactor, the test holding the client's end."""

    def __init__(self, *, fast: bool, limit: int = PRIVILEGED_OUTSTANDING) -> None:
        self.engine = XenstoreEngine()
        self.reactor = Reactor()
        self.server, self.client = socket.socketpair()
        self.client.setblocking(False)
        conn_id = self.engine.connect(ConnKind.SOCKET, 0)
        self.finished = 0
        self.io = ConnIO(
            conn_id,
            self.server,
            OutQueue(lambda: limit),
            self.reactor,
            self.engine.answer_fast if fast else None,
            self.deliver,
            self.dispatch,
            self.done,
        )
        self.reactor.register(self.io, READ)

    def done(self) -> None:
        self.finished += 1

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.io.close()
        self.reactor.close()
        self.server.close()
        self.client.close()

    def deliver(self, out: Outbox) -> None:
        for _, message in out:
            if message.op == Op.WATCH_EVENT:
                self.io.push_event(encode(message))
            else:
                self.io.push(encode(message))
        self.io.flush()

    def dispatch(self, conn_id: int, packet: Packet) -> None:
        self.deliver(self.engine.handle(conn_id, packet))

    def spin(self) -> None:
        for _ in range(1000):
            if not self.reactor.serve_rounds(8, 256):
                return
        raise AssertionError("the socket stays ready: the loop would never wait")

    def feed(self, data: bytes) -> bytes:
        """Send what the kernel takes now; the rest."""
        try:
            return data[self.client.send(data) :]
        except BlockingIOError:
            return data

    def take(self) -> bytes:
        got = bytearray()
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk


PATHS = ["/a", "/a/b", "/a/b/c", "/d", "@introduceDomain", "rel", "/a/"]
OPS = [Op.READ, Op.WRITE, Op.DIRECTORY, Op.MKDIR, Op.RM, Op.WATCH, Op.UNWATCH, Op.GET_PERMS]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    frames = []
    for req_id in range(draw(st.integers(1, 40))):
        op = draw(st.sampled_from(OPS))
        path = draw(st.sampled_from(PATHS)).encode()
        if op == Op.WRITE:
            payload = path + b"\0" + draw(st.binary(max_size=12))
        elif op in (Op.WATCH, Op.UNWATCH):
            payload = path + b"\0tok\0"
        else:
            payload = path + b"\0"
        tx_id = draw(st.sampled_from([0, 0, 0, 7]))
        frames.append(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)
    return b"".join(frames)


@given(requests(), st.integers(1, 64))
def test_the_fast_lane_answers_as_handle_does(stream: bytes, chunk: int) -> None:
    replies = []
    for fast in (True, False):
        with Loop(fast=fast) as loop:
            got = b""
            for i in range(0, len(stream), chunk * 16):
                loop.client.sendall(stream[i : i + chunk * 16])
                loop.spin()
                got += loop.take()
            replies.append(got)
    assert replies[0] == replies[1]


@given(requests(), st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(1, 6))
def test_a_slow_reader_gets_what_a_prompt_one_gets(
    stream: bytes, steps: list[int], limit: int
) -> None:
    """Sends cut anywhere, reads skipped at random, a small queue: the same replies, in order.
    Watch events may differ: an event identical to one still unsent is dropped (C
    send_event()), and what is unsent depends on how fast the client reads."""
    prompt = Loop(fast=False)
    with prompt:
        prompt.client.sendall(stream)
        prompt.spin()
        expected = prompt.take()
    with Loop(fast=True, limit=limit) as loop:
        got = b""
        unsent = b""
        pos = 0
        for step in steps:
            if step == 0 and pos < len(stream):  # send a piece
                cut = min(len(stream), pos + 1 + len(stream) // len(steps))
                unsent += stream[pos:cut]
                pos = cut
            unsent = loop.feed(unsent)
            loop.spin()
            if step in (1, 2):  # read what is there, or not
                got += loop.take()
        unsent += stream[pos:]
        idle = 0
        while unsent or replies(got) != replies(expected):
            unsent = loop.feed(unsent)
            loop.spin()
            chunk = loop.take()
            got += chunk
            idle = 0 if chunk else idle + 1
            assert idle < 100, f"replies stopped: {replies(got)} of {replies(expected)}"
        loop.spin()
        got += loop.take()
        assert replies(got) == replies(expected)
        assert set(events(got)) == set(events(expected))


def messages(data: bytes) -> list[tuple[int, int, bytes]]:
    found = []
    pos = 0
    while pos < len(data):
        op, req_id, _, length = HEADER.unpack_from(data, pos)
        found.append((op, req_id, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return found


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    return [m for m in messages(data) if m[0] != Op.WATCH_EVENT]


def events(data: bytes) -> list[bytes]:
    return [m[2] for m in messages(data) if m[0] == Op.WATCH_EVENT]


def test_a_client_that_does_not_read_is_held_then_served_in_order() -> None:
    value = b"v" * 4000
    with Loop(fast=True, limit=4) as loop:
        loop.client.sendall(HEADER.pack(Op.WRITE, 1, 0, 5 + len(value)) + b"/big\0" + value)
        loop.spin()
        assert loop.take() == HEADER.pack(Op.WRITE, 1, 0, 3) + b"OK\0"
        reads = b"".join(HEADER.pack(Op.READ, 100 + i, 0, 5) + b"/big\0" for i in range(200))
        loop.client.sendall(reads)
        loop.spin()
        assert loop.io.held, "the queue never filled"
        assert len(loop.io.out) == 4
        got = bytearray()
        idle = 0
        while len(got) < 200 * (16 + 4000):
            chunk = loop.take()
            got += chunk
            loop.spin()
            idle = 0 if chunk else idle + 1
            assert idle < 100, f"replies stopped after {len(got)} bytes"
        ids = []
        pos = 0
        while pos < len(got):
            op, req_id, _, length = HEADER.unpack_from(got, pos)
            assert op == Op.READ and got[pos + 16 : pos + 16 + length] == value
            ids.append(req_id)
            pos += 16 + length
        assert ids == [100 + i for i in range(200)]
        assert not loop.io.held


def test_a_client_that_hangs_up_gets_its_replies_first() -> None:
    with Loop(fast=True) as loop:
        loop.client.sendall(HEADER.pack(Op.WRITE, 1, 0, 5) + b"/a\0xy")
        loop.client.shutdown(socket.SHUT_WR)
        loop.spin()
        assert loop.take() == HEADER.pack(Op.WRITE, 1, 0, 3) + b"OK\0"
        assert loop.io.eof and loop.finished == 1
        assert not loop.io.closed


def test_an_oversized_header_closes_without_a_reply() -> None:
    with Loop(fast=True) as loop:
        loop.client.sendall(HEADER.pack(Op.READ, 1, 0, 4097))
        loop.spin()
        assert loop.io.closed and loop.finished == 1
        assert loop.take() == b""

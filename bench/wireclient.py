"""A blocking raw-wire client with pipelining, on the sans-IO codec of ``xenstored_sim.wire``.

The harness talks to both daemons with the same bytes, so the client costs the same for each.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterable, Iterator

from xenstored_sim.wire import HEADER, NEED_DATA, Op, Packet, PacketDecoder

from .daemons import BenchError


class WireConn:
    """One socket connection; replies are matched by ``req_id``, events are counted."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = PacketDecoder()
        self.next_id = 0
        self.events = 0
        self.inflight = 0

    def close(self) -> None:
        self.sock.close()

    def frame(self, op: Op, payload: bytes, tx: int = 0) -> bytes:
        self.next_id += 1
        return HEADER.pack(op, self.next_id, tx, len(payload)) + payload

    def receive(self) -> list[Packet]:
        """Block for the next bytes; return the replies among the packets they complete."""
        data = self.sock.recv(1 << 18)
        if not data:
            raise BenchError("the daemon closed the connection")
        self.decoder.receive_data(data)
        replies: list[Packet] = []
        while True:
            pkt = self.decoder.next_packet()
            if pkt is NEED_DATA:
                return replies
            assert isinstance(pkt, Packet)
            if pkt.op == Op.WATCH_EVENT:
                self.events += 1
            else:
                replies.append(pkt)

    def call(self, op: Op, payload: bytes, tx: int = 0) -> bytes:
        """One request, one reply; an ERROR reply raises :class:`BenchError`."""
        self.sock.sendall(self.frame(op, payload, tx))
        want = self.next_id
        while True:
            for pkt in self.receive():
                if pkt.req_id == want:
                    if pkt.op == Op.ERROR:
                        raise BenchError(f"{op.name} {payload[:60]!r}: {pkt.payload!r}")
                    return pkt.payload

    def wait_events(self, count: int) -> None:
        while self.events < count:
            self.receive()


def pipeline(conns: list[WireConn], requests: Iterable[tuple[Op, bytes]], window: int) -> int:
    """Send ``requests`` over ``conns`` with up to ``window`` in flight on each; returns the
    number sent.  Any ERROR reply raises."""
    it: Iterator[tuple[Op, bytes]] = iter(requests)
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.inflight = 0
    sent = 0
    exhausted = False
    try:
        while True:
            if not exhausted:
                for c in conns:
                    room = window - c.inflight
                    if room <= window // 2:
                        continue
                    batch = []
                    for _ in range(room):
                        try:
                            op, payload = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        batch.append(c.frame(op, payload))
                    if batch:
                        c.sock.sendall(b"".join(batch))
                        c.inflight += len(batch)
                        sent += len(batch)
                    if exhausted:
                        break
            if exhausted and all(c.inflight == 0 for c in conns):
                return sent
            for key, _ in sel.select():
                c = key.data
                assert isinstance(c, WireConn)
                for pkt in c.receive():
                    if pkt.op == Op.ERROR:
                        raise BenchError(f"pipelined request failed: {pkt.payload!r}")
                    c.inflight -= 1
    finally:
        sel.close()


def timed_calls(conn: WireConn, calls: Iterable[tuple[Op, bytes]]) -> list[int]:
    """Latency of each call in ns, one outstanding at a time."""
    out: list[int] = []
    clock = time.perf_counter_ns
    for op, payload in calls:
        t0 = clock()
        conn.call(op, payload)
        out.append(clock() - t0)
    return out

"""The client against a scripted peer over trio's memory streams: replies out of order, and a
peer that breaks the protocol.  A real daemon answers in order and never misbehaves, so these
cases need a peer that does."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from xenstored_sim.client import UnexpectedReply, XsDisconnected, wrap_xenstore
from xenstored_sim.wire import HEADER, Op, Packet, PacketDecoder, encode

LIMIT = 5


async def receive_requests(stream: trio.abc.Stream, n: int) -> list[Packet]:
    decoder = PacketDecoder()
    got: list[Packet] = []
    while len(got) < n:
        decoder.receive_data(bytes(await stream.receive_some()))
        while isinstance(packet := decoder.next_packet(), Packet):
            got.append(packet)
    return got


async def test_replies_out_of_order_reach_their_callers() -> None:
    client_end, peer = trio.testing.memory_stream_pair()
    results: dict[str, bytes] = {}

    async def read(xs: object, path: str) -> None:
        results[path] = await xs.read(path)  # type: ignore[attr-defined]

    with trio.fail_after(LIMIT):
        async with wrap_xenstore(client_end) as xs, trio.open_nursery() as nursery:
            for path in ("/a", "/b", "/c"):
                nursery.start_soon(read, xs, path)
            requests = await receive_requests(peer, 3)
            # Answer in reverse order, with a watch event for nobody in between.
            await peer.send_all(encode(Packet(Op.WATCH_EVENT, 0, 0, b"/x\0t\0")))
            for req in reversed(requests):
                value = req.payload.rstrip(b"\0") + b"-value"
                await peer.send_all(encode(Packet(Op.READ, req.req_id, 0, value)))
    assert results == {"/a": b"/a-value", "/b": b"/b-value", "/c": b"/c-value"}


async def test_reply_to_unknown_req_id_fails_every_waiter() -> None:
    client_end, peer = trio.testing.memory_stream_pair()
    failures: list[BaseException] = []

    async def read(xs: object) -> None:
        try:
            await xs.read("/a")  # type: ignore[attr-defined]
        except XsDisconnected as exc:
            failures.append(exc)

    with trio.fail_after(LIMIT):
        async with wrap_xenstore(client_end) as xs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, xs)
                nursery.start_soon(read, xs)
                await receive_requests(peer, 2)
                await peer.send_all(encode(Packet(Op.READ, 4242, 0, b"?")))
            assert not xs.connected
    assert len(failures) == 2
    assert all(isinstance(f.__cause__, UnexpectedReply) for f in failures)


async def test_oversized_reply_header_closes_the_connection() -> None:
    client_end, peer = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT):
        async with wrap_xenstore(client_end) as xs:
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    (req,) = await receive_requests(peer, 1)
                    await peer.send_all(HEADER.pack(Op.READ, req.req_id, 0, 5000))

                nursery.start_soon(answer)
                with pytest.raises(XsDisconnected):
                    await xs.read("/a")
            with pytest.raises(XsDisconnected):
                await xs.read("/a")


async def test_wrong_reply_type_is_reported() -> None:
    from xenstored_sim.wire import RemoteProtocolError

    client_end, peer = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT):
        async with wrap_xenstore(client_end) as xs, trio.open_nursery() as nursery:

            async def answer() -> None:
                (req,) = await receive_requests(peer, 1)
                await peer.send_all(encode(Packet(Op.DIRECTORY, req.req_id, 0, b"")))

            nursery.start_soon(answer)
            with pytest.raises(RemoteProtocolError, match="READ answered by DIRECTORY"):
                await xs.read("/a")


async def test_body_exceptions_leave_the_block_unwrapped() -> None:
    client_end, _peer = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError):
        async with wrap_xenstore(client_end):
            raise KeyError("mine")


async def test_peer_closing_fails_watches_and_requests() -> None:
    client_end, peer = trio.testing.memory_stream_pair()
    with trio.fail_after(LIMIT):
        async with wrap_xenstore(client_end) as xs, trio.open_nursery() as nursery:

            async def serve_watch_then_close() -> None:
                (req,) = await receive_requests(peer, 1)
                await peer.send_all(encode(Packet(Op.WATCH, req.req_id, 0, b"OK\0")))
                await peer.send_all(encode(Packet(Op.WATCH_EVENT, 0, 0, b"/w\0t\0")))
                await peer.aclose()

            nursery.start_soon(serve_watch_then_close)
            async with xs.watch("/w", "t") as events:
                assert (await events.receive()).path == "/w"
                with pytest.raises(XsDisconnected) as exc:
                    await events.receive()
                assert isinstance(exc.value.__cause__, EOFError)

"""The trio client against a real daemon process over its Unix socket."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import trio

from xenstored_sim.client import (
    Transaction,
    WatchEvent,
    WatchOverflow,
    XsClient,
    XsDisconnected,
    open_xenstore,
)
from xenstored_sim.wire import LocalProtocolError, Op, XsError, join_args

# The conftest's Daemon (socket, rundir, pid, guest_socket(), kill()); conftest is no module.
Daemon = Any

# Every test runs under an absolute deadline: a hang fails instead of blocking the suite.
LIMIT = 10


async def wait_for_path(path: str) -> None:
    while not os.path.exists(path):
        await trio.sleep(0.01)


async def test_node_round_trip(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        await xs.write("/t/a/b", "hello")
        await xs.write("/t/bin", b"\x00\xff raw")
        await xs.mkdir("/t/empty")
        assert await xs.read("/t/a/b") == b"hello"
        assert await xs.read("/t/bin") == b"\x00\xff raw"
        assert await xs.read("/t/a") == b""
        assert await xs.directory("/t") == ["a", "bin", "empty"]
        assert await xs.directory("/t/empty") == []
        assert await xs.get_perms("/t/a/b") == ["n0"]
        await xs.set_perms("/t/a/b", ["b0", "r3", "w4"])
        assert await xs.get_perms("/t/a/b") == ["b0", "r3", "w4"]
        await xs.rm("/t/a")
        assert await xs.directory("/t") == ["bin", "empty"]


async def test_relative_paths_live_under_local_domain_0(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        await xs.write("rel/x", "1")
        assert await xs.read("/local/domain/0/rel/x") == b"1"
        assert await xs.get_domain_path(0) == "/local/domain/0"


async def test_errors_carry_errno_name_op_and_path(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        with pytest.raises(XsError) as missing:
            await xs.read("/no/such")
        assert missing.value.errno_name == "ENOENT"
        assert (missing.value.op, missing.value.path) == ("READ", "/no/such")
        with pytest.raises(XsError) as bad:
            await xs.write("/bad.path", "x")
        assert bad.value.errno_name == "EINVAL"
        with pytest.raises(XsError) as root:
            await xs.rm("/")
        assert root.value.errno_name == "EINVAL"
        with pytest.raises(XsError) as perms:
            await xs.set_perms("/tool", ["x0"])
        assert perms.value.errno_name == "EINVAL"
        with pytest.raises(XsError) as tx:
            await xs.read("/tool", tx=424242)
        assert tx.value.errno_name == "ENOENT"
        # The connection is still good after error replies.
        assert await xs.read("/tool") == b""


async def test_raw_request_returns_the_reply_as_is(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        reply = await xs.request(99, b"")
        assert (reply.op, reply.payload) == (Op.ERROR, b"ENOSYS\0")
        reply = await xs.request(Op.READ, join_args("/tool"), tx_id=999999)
        assert (reply.op, reply.tx_id, reply.payload) == (Op.ERROR, 999999, b"ENOENT\0")
        reply = await xs.request(Op.GET_DOMAIN_PATH, join_args("7"))
        assert (reply.op, reply.payload) == (Op.GET_DOMAIN_PATH, b"/local/domain/7\0")


async def test_oversized_request_is_refused_locally(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        with pytest.raises(LocalProtocolError):
            await xs.write("/big", b"x" * 4096)
        assert xs.statistics().pending_replies == 0
        await xs.write("/big", b"x" * 4000)
        assert len(await xs.read("/big")) == 4000


async def test_concurrent_requests_from_many_tasks_match_by_req_id(xenstored: Daemon) -> None:
    results: dict[int, bytes] = {}

    async def worker(xs: XsClient, i: int) -> None:
        for round_ in range(5):
            await xs.write(f"/c/{i}", f"{i}-{round_}")
            results[i] = await xs.read(f"/c/{i}")
            assert results[i] == f"{i}-{round_}".encode()

    with trio.fail_after(LIMIT):
        async with open_xenstore(xenstored.socket) as xs:
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(worker, xs, i)
            assert xs.statistics().pending_replies == 0
            assert sorted(await xs.directory("/c"), key=int) == [str(i) for i in range(40)]
    assert results == {i: f"{i}-4".encode() for i in range(40)}


async def test_default_path_comes_from_the_environment(
    xenstored: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENSTORED_PATH", xenstored.socket)
    with trio.fail_after(LIMIT):
        async with open_xenstore() as xs:
            assert await xs.read("/tool/xenstored") == b""


async def test_watch_sees_initial_event_then_changes(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with xs.watch("/w", "tok") as events:
            assert await events.receive() == WatchEvent("/w", "tok")
            await xs.write("/w", "1")
            await xs.write("/w/child/deep", "2")
            await xs.write("/elsewhere", "3")
            await xs.rm("/w")
            got = [await events.receive() for _ in range(3)]
        assert got == [
            WatchEvent("/w", "tok"),
            WatchEvent("/w/child/deep", "tok"),
            WatchEvent("/w", "tok"),
        ]


async def test_async_for_over_a_watch(xs: XsClient) -> None:
    seen: list[str] = []
    with trio.fail_after(LIMIT):
        async with xs.watch("/loop", "t") as events:
            await xs.write("/loop/a", "")
            await xs.write("/loop/b", "")
            async for ev in events:
                seen.append(ev.path)
                if len(seen) == 3:
                    break
    assert seen == ["/loop", "/loop/a", "/loop/b"]


async def test_watches_are_demultiplexed_by_token_and_path(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with (
            xs.watch("/m/a", "ta") as wa,
            xs.watch("/m/b", "tb") as wb,
            xs.watch("/m/a", "other") as wa2,
            xs.watch("rel", "tr") as wrel,
        ):
            for w in (wa, wb, wa2, wrel):
                assert (await w.receive()).path == w.path
            await xs.write("/m/b/x", "")
            await xs.write("/m/a/y", "")
            await xs.write("rel/z", "")
            assert await wb.receive() == WatchEvent("/m/b/x", "tb")
            assert await wa.receive() == WatchEvent("/m/a/y", "ta")
            assert await wa2.receive() == WatchEvent("/m/a/y", "other")
            assert await wrel.receive() == WatchEvent("rel/z", "tr")
            assert xs.statistics().watches == 4
            for w in (wa, wb, wa2, wrel):
                assert w._receive.statistics().current_buffer_used == 0


async def test_leaving_the_block_unwatches(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with xs.watch("/u", "t") as events:
            await events.receive()
        assert xs.statistics().watches == 0
        # The daemon forgot it too: the same watch registers again instead of EEXIST.
        async with xs.watch("/u", "t") as events:
            assert await events.receive() == WatchEvent("/u", "t")
        reply = await xs.request(Op.UNWATCH, join_args("/u", "t"))
        assert reply.payload == b"ENOENT\0"


async def test_duplicate_watch_is_eexist(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with xs.watch("/d", "t"):
            with pytest.raises(XsError) as exc:
                async with xs.watch("/d", "t"):
                    pass
            assert exc.value.errno_name == "EEXIST"


async def test_watch_overflow_is_raised_not_hidden(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with xs.watch("/o", "t", buffer=3) as events:
            for i in range(6):
                await xs.write("/o", str(i))
            # Fence: every event of those writes arrived before this reply.
            await xs.read("/o")
            got = [await events.receive() for _ in range(3)]
            assert [e.path for e in got] == ["/o"] * 3
            with pytest.raises(WatchOverflow):
                await events.receive()
            assert not events.active
        assert xs.statistics().watches == 0


async def test_reset_watches_ends_iteration(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        async with xs.watch("/r", "t") as events:
            await events.receive()
            await xs.reset_watches()
            assert [ev async for ev in events] == []
        async with xs.watch("/r", "t") as events:
            assert (await events.receive()).path == "/r"


async def test_transaction_commits_on_exit_and_isolates(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        await xs.write("/tx/a", "before")
        async with xs.transaction() as t:
            assert isinstance(t, Transaction) and t.id != 0
            await t.write("/tx/a", "inside")
            await t.mkdir("/tx/new")
            assert await t.read("/tx/a") == b"inside"
            assert await xs.read("/tx/a") == b"before"
            assert await t.directory("/tx") == ["a", "new"]
            assert await xs.directory("/tx") == ["a"]
        assert await xs.read("/tx/a") == b"inside"
        assert await xs.directory("/tx") == ["a", "new"]


async def test_transaction_aborts_on_exception(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        await xs.write("/tx/a", "kept")
        tx_id = 0
        with pytest.raises(KeyError):
            async with xs.transaction() as t:
                tx_id = t.id
                await t.write("/tx/a", "lost")
                await t.rm("/tx")
                raise KeyError("boom")
        assert await xs.read("/tx/a") == b"kept"
        with pytest.raises(XsError) as exc:
            await xs.transaction_end(tx_id, commit=False)
        assert exc.value.errno_name == "ENOENT"


async def test_conflicting_commit_raises_eagain(xenstored: Daemon, xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        await xs.write("/x", "0")
        async with open_xenstore(xenstored.socket) as other:
            with pytest.raises(XsError) as exc:
                async with xs.transaction() as t:
                    await t.read("/x")
                    await other.write("/x", "outside")
                    await t.write("/x", "inside")
            assert exc.value.errno_name == "EAGAIN"
        assert await xs.read("/x") == b"outside"


async def test_run_transaction_retries_a_real_eagain(xenstored: Daemon, xs: XsClient) -> None:
    attempts = 0
    with trio.fail_after(LIMIT):
        await xs.write("/counter", "0")
        async with open_xenstore(xenstored.socket) as other:

            async def increment(t: Transaction) -> int:
                nonlocal attempts
                attempts += 1
                value = int(await t.read("/counter"))
                if attempts == 1:
                    await other.write("/counter", "10")
                await t.write("/counter", str(value + 1))
                return value + 1

            assert await xs.run_transaction(increment) == 11
    assert attempts == 2
    assert await xs.read("/counter") == b"11"


async def test_run_transaction_gives_up_after_its_attempts(xenstored: Daemon, xs: XsClient) -> None:
    calls = 0
    with trio.fail_after(LIMIT):
        await xs.write("/hot", "0")
        async with open_xenstore(xenstored.socket) as other:

            async def always_conflicts(t: Transaction) -> None:
                nonlocal calls
                calls += 1
                await t.read("/hot")
                await other.write("/hot", str(calls))
                await t.write("/hot", "mine")

            with pytest.raises(XsError) as exc:
                await xs.run_transaction(always_conflicts, attempts=3)
    assert exc.value.errno_name == "EAGAIN"
    assert calls == 3


async def test_directory_falls_back_to_directory_part_on_e2big(xs: XsClient) -> None:
    names = [f"child-number-{i:04d}" for i in range(300)]  # 5700 bytes of names
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(xs.mkdir, f"/big/{name}")
        reply = await xs.request(Op.DIRECTORY, join_args("/big"))
        assert reply.payload == b"E2BIG\0"
        assert sorted(await xs.directory("/big")) == names
        first = await xs.directory_part("/big", 0)
        assert not first.complete
        assert set(first.names) <= set(names) and 0 < len(first.names) < len(names)


async def test_domain_operations(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        assert await xs.is_domain_introduced(0)
        assert not await xs.is_domain_introduced(5)
        async with xs.watch("@introduceDomain", "intro") as intro:
            assert await intro.receive() == WatchEvent("@introduceDomain", "intro")
            await xs.introduce(5, 4660, 7)
            assert await intro.receive() == WatchEvent("@introduceDomain", "intro")
        assert await xs.is_domain_introduced(5)
        assert await xs.get_domain_path(5) == "/local/domain/5"
        await xs.resume(5)
        await xs.introduce(6, 4661, 8)
        await xs.set_target(6, 5)
        async with xs.watch("@releaseDomain", "rel") as released:
            await released.receive()
            await xs.release(6)
            assert await released.receive() == WatchEvent("@releaseDomain", "rel")
        with pytest.raises(XsError) as exc:
            await xs.release(6)
        assert exc.value.errno_name == "ENOENT"
        with pytest.raises(XsError) as exc:
            await xs.introduce(7, 1, 0)
        assert exc.value.errno_name == "EINVAL"


async def test_guest_socket_acts_as_its_domain(xenstored: Daemon, xs: XsClient) -> None:
    guest_path: str = xenstored.guest_socket(3)
    with trio.fail_after(LIMIT):
        await xs.write("/local/domain/3", "")
        await xs.set_perms("/local/domain/3", ["n3"])
        await xs.write("/secret", "dom0 only")
        await xs.introduce(3, 1, 1)
        await wait_for_path(guest_path)
        async with open_xenstore(guest_path) as guest:
            await guest.write("data/x", "from guest")
            assert await guest.read("/local/domain/3/data/x") == b"from guest"
            assert await guest.get_perms("data/x") == ["n3"]
            with pytest.raises(XsError) as exc:
                await guest.read("/secret")
            assert exc.value.errno_name == "EACCES"
            with pytest.raises(XsError) as exc:
                await guest.write("/local/domain/0/x", "no")
            assert exc.value.errno_name == "EACCES"
        assert await xs.read("/local/domain/3/data/x") == b"from guest"


async def test_control(xs: XsClient) -> None:
    with trio.fail_after(LIMIT):
        assert await xs.control("print", "client test") == b"OK"
        with pytest.raises(XsError):
            await xs.control("no-such-command")


def _signal(daemon: Daemon) -> Callable[[int], None]:
    pid: int = daemon.pid
    return lambda sig: os.kill(pid, sig)


async def test_every_waiter_fails_when_the_daemon_is_killed(xenstored: Daemon) -> None:
    send_signal = _signal(xenstored)
    outcomes: list[BaseException] = []

    async def reader(xs: XsClient, i: int) -> None:
        try:
            await xs.read(f"/k/{i}")
        except BaseException as exc:
            outcomes.append(exc)
            raise

    with trio.fail_after(LIMIT):
        async with open_xenstore(xenstored.socket) as xs:
            async with xs.watch("/k", "t") as events:
                await events.receive()
                send_signal(signal.SIGSTOP)
                try:
                    async with trio.open_nursery() as nursery:
                        for i in range(8):
                            nursery.start_soon(reader, xs, i)
                        while xs.statistics().pending_replies < 8:
                            await trio.sleep(0.01)
                        xenstored.kill()
                except BaseExceptionGroup as group:
                    assert group.subgroup(XsDisconnected) is not None
                    assert group.split(XsDisconnected)[1] is None
                with pytest.raises(XsDisconnected):
                    await events.receive()
            assert len(outcomes) == 8
            assert all(isinstance(exc, XsDisconnected) for exc in outcomes)
            assert not xs.connected
            with pytest.raises(XsDisconnected):
                await xs.read("/k")


async def test_cancelled_request_does_not_break_the_connection(xenstored: Daemon) -> None:
    send_signal = _signal(xenstored)
    with trio.fail_after(LIMIT):
        async with open_xenstore(xenstored.socket) as xs:
            await xs.write("/c", "v")
            send_signal(signal.SIGSTOP)
            try:
                with trio.move_on_after(0.2) as scope:
                    await xs.read("/c")
                assert scope.cancelled_caught
                assert xs.statistics().pending_replies == 0
            finally:
                send_signal(signal.SIGCONT)
            # The late reply to the abandoned READ is swallowed; later replies still match.
            for _ in range(3):
                assert await xs.read("/c") == b"v"
            assert xs.connected

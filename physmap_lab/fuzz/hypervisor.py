"""Fuzzing hypervisor-sim.

Workers send random and mutated hypercall frames (msgpack with damaged or retyped fields,
unknown calls, garbage that is not msgpack, lengths over the frame limit) to ``hypervisor.sock``,
aimed at a domain of their own, while a well-behaved client keeps making round trips about
another.  Afterwards hypervisor-sim must still run, have logged no traceback and serve a fresh
connection.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import (
    FrameDecoder,
    HypercallError,
    HypervisorDisconnected,
    MalformedMessage,
    ProtocolError,
    pack,
    unpack,
)

from .generators import HypercallFrameMaker
from .report import PROGRESS_LIMIT, Budget, FuzzReport


async def _hv_drain(stream: trio.SocketStream, synced: trio.Event, sync_id: int) -> None:
    dec = FrameDecoder()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
        while chunk := await stream.receive_some(65536):
            dec.receive_data(chunk)
            while isinstance(payload := dec.next_payload(), bytes):
                with contextlib.suppress(MalformedMessage):
                    if unpack(payload).get("id") == sync_id:
                        synced.set()


async def _hv_connection(
    rng: HypercallFrameMaker, path: Path, budget: Budget, report: FuzzReport
) -> None:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        report.problems.append(f"hypervisor-sim refused a connection: {exc}")
        budget.left = 0
        return
    report.connections += 1
    sync_id = 1 << 30
    synced = trio.Event()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(_hv_drain, stream, synced, sync_id)
        try:
            with trio.move_on_after(PROGRESS_LIMIT):
                ended = False
                for i in range(rng.randint(1, 200)):
                    if budget.left <= 0:
                        break
                    budget.left -= 1
                    data, ends = rng.frame(i + 1)
                    report.frames += 1
                    await stream.send_all(data)
                    if ends:
                        ended = True
                        report.dropped += 1
                        break
                if not ended:
                    sync = {"id": sync_id, "call": "version", "args": {}}
                    await stream.send_all(pack(sync))
                    await synced.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            report.dropped += 1
        nursery.cancel_scope.cancel()


async def _hv_good_client(path: Path, domid: int, report: FuzzReport, done: trio.Event) -> None:
    async with open_hypervisor(path) as hv:
        while not done.is_set() or report.good_requests == 0:
            with trio.fail_after(PROGRESS_LIMIT):
                if (await hv.version())["xen"] != "4.17":
                    raise AssertionError("version changed")
                info = await hv.domain_getinfo(domid)
                if info["domid"] != domid:
                    raise AssertionError(f"domain_getinfo({domid}) answered {info}")
                await hv.domain_list()
            report.good_requests += 3
            await trio.sleep(0.002)


async def fuzz_hypervisor(
    socket_path: Path, frames: int, seed: int = 0, *, workers: int = 4
) -> FuzzReport:
    """Fuzz the hypervisor-sim serving ``socket_path`` with ``frames`` frames.

    The caller owns the daemon and checks that it survived and logged no traceback."""
    report = FuzzReport()
    start = time.monotonic()
    async with open_hypervisor(socket_path) as hv:
        good = await hv.domain_create("fuzz-good", 64)
        await hv.populate_physmap(good, range(16))
        target = await hv.domain_create("fuzz-target", 256)
        await hv.populate_physmap(target, range(16))
    budget = Budget(frames)
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hv_good_client, socket_path, good, report, done)
            async with trio.open_nursery() as fuzzers:
                for w in range(workers):
                    rng = HypercallFrameMaker(seed * 1000 + w, target)
                    fuzzers.start_soon(_hv_worker, rng, socket_path, budget, report)
            done.set()
    except trio.TooSlowError:
        report.problems.append(f"a well-behaved hypercall took over {PROGRESS_LIMIT} s")
    except (HypercallError, HypervisorDisconnected, AssertionError) as exc:
        report.problems.append(f"the well-behaved client failed: {exc!r}")
    report.seconds = time.monotonic() - start
    if not report.problems:
        with trio.fail_after(PROGRESS_LIMIT):
            async with open_hypervisor(socket_path) as hv:
                await hv.version()
                await hv.domain_getinfo(good)
    return report


async def _hv_worker(
    rng: HypercallFrameMaker, path: Path, budget: Budget, report: FuzzReport
) -> None:
    while budget.left > 0:
        await _hv_connection(rng, path, budget, report)

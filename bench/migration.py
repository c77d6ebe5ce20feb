"""Live migration of a 256 MiB guest with 16 MiB of video memory between two hosts.

The two hosts run in two network namespaces joined by a veth pair when the machine allows it
(physmap_lab/netns.py), else side by side on 127.0.0.1.  The guest fills its RAM first (so every
page carries data), then dirties memory at a set rate while ``xl-sim migrate`` runs: every
:data:`TICK_S` it writes 8 bytes into each of ``rate * TICK_S`` random pages of its RAM.  For
each mode and rate: the downtime (suspend to the receiver's report that the domain runs),
the total time, the pre-copy rounds and the pages each round sent (the convergence).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from physmap_lab.migration import Host, _finish, start_receiver, two_hosts
from xenhost import RunDir

from .daemons import scratch_dir
from .results import Results, Target

MODES: Final = ("new", "compat")
MIB: Final = 1 << 20
TICK_S: Final = 0.01


@dataclass(frozen=True)
class Sizes:
    memory_mib: int
    videoram_mib: int
    rates: tuple[int, ...]  # pages dirtied per second
    repeats: int


FULL = Sizes(memory_mib=256, videoram_mib=16, rates=(0, 2000, 20000), repeats=2)
QUICK = Sizes(memory_mib=16, videoram_mib=16, rates=(2000,), repeats=1)


async def _xl(h: Host, *args: str) -> dict[str, Any]:
    proc = await trio.run_process(
        h.xl(*args), capture_stdout=True, capture_stderr=True, check=False
    )
    out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if proc.returncode:
        raise ValueError(f"xl-sim {args[0]}: {out.get('error')}")
    return out


async def _dirty(h: Host, domid: int, pages: int, rate: int, stop: trio.Event) -> None:
    """The guest writing ``rate`` random pages of its RAM per second until paused or gone."""
    rng = random.Random(rate)
    per_tick = max(1, round(rate * TICK_S))
    async with open_hypervisor(RunDir(h.rundir).hypervisor_socket) as hv:
        while rate and not stop.is_set():
            ops: list[Mapping[str, Any]] = [
                {"op": "mem_write", "gpa": rng.randrange(pages) << 12, "data": rng.randbytes(8)}
                for _ in range(per_tick)
            ]
            try:
                await hv.guest(domid, ops)
            except HypercallError as exc:
                if exc.errno_name != "EBUSY":
                    return
            except HypervisorDisconnected:
                return
            await trio.sleep(TICK_S)


async def _one(src: Host, dst: Host, mode: str, rate: int, sz: Sizes) -> dict[str, Any]:
    made = await _xl(
        src, "create", "--memory", str(sz.memory_mib), "--videoram", str(sz.videoram_mib),
        "--vga", "stdvga", "--dm-mode", mode,
    )  # fmt: skip
    domid = int(made["domid"])
    fill = {"op": "mem_fill", "gpa": 0, "len": sz.memory_mib * MIB, "seed": rate}
    async with open_hypervisor(RunDir(src.rundir).hypervisor_socket) as hv:
        await hv.guest(domid, [fill])
    receiver, where = await start_receiver(dst)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_dirty, src, domid, sz.memory_mib * 256, rate, stop)
        t0 = time.perf_counter()
        try:
            sent = await _xl(src, "migrate", str(domid), where)
        finally:
            stop.set()
        wall = time.perf_counter() - t0
    received = await _finish(receiver)
    for d in (await _xl(dst, "list"))["domains"]:
        await _xl(dst, "destroy", str(d["domid"]))
    return {
        "downtime_s": sent["downtime_s"],
        "total_s": sent["total_s"],
        "command_s": wall,
        "precopy_rounds": sent["precopy_rounds"],
        "pages_per_round": sent["pages_per_round"],
        "pages_sent": sent["pages_sent"],
        "bytes": sent["bytes"],
        # The downtime by step, and the destination's restore (inside "destination") by phase.
        "stop_copy_s": sent["stop_copy_s"],
        "restore_phases_s": received.get("phases", {}),
    }


async def _measure(sz: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with scratch_dir("pl-bench-mig-") as work:
        async with two_hosts(work, tag=f"b{os.getpid() % 10000}") as (src, dst):
            out["network"] = "netns" if src.ns is not None else "loopback"
            for mode in MODES:
                for rate in sz.rates:
                    runs = [await _one(src, dst, mode, rate, sz) for _ in range(sz.repeats)]
                    out[f"{mode}@{rate}"] = {"mode": mode, "rate_pages_s": rate, "runs": runs}
    return out


def _steps(runs: list[dict[str, Any]]) -> str:
    """The downtime by step and the destination's restore by phase, medians in ms."""

    def shown(key: str) -> str:
        names = runs[0][key]
        return ", ".join(
            f"{n} {statistics.median(r[key].get(n, 0.0) for r in runs) * 1000:.0f}" for n in names
        )

    return f"downtime steps ms: {shown('stop_copy_s')}; restore ms: {shown('restore_phases_s')}"


def measure(results: Results, sz: Sizes) -> dict[str, Any]:
    found = trio.run(_measure, sz)
    guest = f"{sz.memory_mib} MiB + {sz.videoram_mib} MiB VRAM, {found['network']}"
    for key, m in found.items():
        if key == "network":
            continue

        def med(field: str, m: dict[str, Any] = m) -> float:
            return float(statistics.median(r[field] for r in m["runs"]))

        rounds = m["runs"][0]["pages_per_round"]
        note = f"{guest}; {m['rate_pages_s']} pages/s dirtied; pages per round {rounds}"
        for field, label in (("downtime_s", "downtime"), ("total_s", "total")):
            results.add(
                Target(
                    "migration",
                    f"migration {label} ({m['mode']}, {m['rate_pages_s']} pages/s)",
                    med(field) * 1000,
                    "ms",
                    "reported",
                    note=note if field == "total_s" else f"{note}; {_steps(m['runs'])}",
                )
            )
        results.add(
            Target(
                "migration",
                f"pre-copy rounds ({m['mode']}, {m['rate_pages_s']} pages/s)",
                med("precopy_rounds"),
                "rounds",
                "reported",
                note=f"last pre-copy round {rounds[-2] if len(rounds) > 1 else rounds[0]} pages, "
                f"final round {rounds[-1]} pages",
            )
        )
    return {"sizes": sz.__dict__, "cases": found}

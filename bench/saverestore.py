"""Save and restore of a 256 MiB guest with 16 MiB of video memory.

Before each save the guest fills all of its RAM with pseudo-random bytes (its own
``mem_fill``), so the image carries 256 MiB of real data rather than the holes of a guest
that never touched its memory; after the restore the guest's RAM hash is checked against
the one taken before the save.

The bandwidths are compared with ``cp`` of the same bytes in the same run: for a save, the
guest's memory file (``RUNDIR/mem/dom<domid>.mem``, just filled, so in the page cache) copied
to a new file beside the image; for a restore, the image (just written, so warm, as it is for
the restore that follows) copied to a new file in the memory directory.  A copy is the honest
limit of a save or a restore, which each move every byte from one file to another.  Two
figures are given per direction: the whole ``xl save`` (suspend, image, destroy) or ``xl
restore`` (start to unpaused guest), and the memory copy alone (the image write or memory
load step of the result's ``phases``).  ``cat IMAGE > /dev/null``, warm and cold (the image's
pages dropped with ``posix_fadvise(DONTNEED)`` after ``fsync``), is recorded for reference.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from physmap_lab.stack import open_stack
from toolstack.config import DomainConfig
from toolstack.libxl import Libxl, open_libxl
from xenhost import RunDir

from .daemons import scratch_dir
from .results import Results, Target, ratio

MODES = ("new", "compat")
MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    memory_mib: int
    videoram_mib: int
    repeats: int
    cat_repeats: int


FULL = Sizes(memory_mib=256, videoram_mib=16, repeats=3, cat_repeats=3)
QUICK = Sizes(memory_mib=16, videoram_mib=16, repeats=1, cat_repeats=1)


def cat_seconds(image: Path, repeats: int, *, cold: bool = False) -> float:
    """Median wall time of ``cat image > /dev/null``; with ``cold`` the image's pages are
    written back and dropped from the page cache before each read."""
    walls = []
    for _ in range(repeats):
        if cold:
            fd = os.open(image, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        t0 = time.perf_counter()
        with open("/dev/null", "wb") as null:
            subprocess.run(["cat", str(image)], stdout=null, check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def cp_seconds(src: Path, dest: Path, repeats: int) -> float:
    """Median wall time of ``cp src dest`` (a new file each time, removed after)."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(dest)], check=True)
        walls.append(time.perf_counter() - t0)
        dest.unlink()
    return statistics.median(walls)


async def _ram_sha256(xl: Libxl, domid: int, sz: Sizes) -> str:
    op = {"op": "mem_sha256", "gpa": 0, "len": sz.memory_mib * MIB}
    return str((await xl.guest_ops(domid, [op]))[0])


async def _one_mode(rundir: Path, work: Path, mode: str, sz: Sizes) -> dict[str, Any]:
    async with open_libxl(rundir, command="bench") as xl:
        runs = [await _one_run(xl, rundir, work, mode, i, sz) for i in range(sz.repeats)]
    return _summary(runs)


async def _filled_guest(xl: Libxl, mode: str, i: int, sz: Sizes) -> tuple[int, str]:
    """A new guest that has filled its RAM with seeded bytes: its domid and RAM hash."""
    config = DomainConfig(
        name=f"bench-{mode}-{i}",
        memory_mib=sz.memory_mib,
        videoram_mib=sz.videoram_mib,
        dm_mode=mode,  # type: ignore[arg-type]
    )
    created = await xl.create(config)
    fill = {"op": "mem_fill", "gpa": 0, "len": sz.memory_mib * MIB, "seed": i}
    await xl.guest_ops(created.domid, [fill])
    return created.domid, await _ram_sha256(xl, created.domid, sz)


async def _one_run(
    xl: Libxl, rundir: Path, work: Path, mode: str, i: int, sz: Sizes
) -> dict[str, Any]:
    """One save and restore, timed beside ``cp`` and ``cat`` of the same bytes."""
    domid, ram = await _filled_guest(xl, mode, i, sz)
    image = work / f"{mode}-{i}.img"
    memfile = RunDir(rundir).guest_memory(domid)
    cp_save_s = await trio.to_thread.run_sync(
        cp_seconds, memfile, work / "cp-save.img", sz.cat_repeats
    )
    mem_bytes = memfile.stat().st_size
    t0 = time.perf_counter()
    saved = await xl.save(domid, image)
    save_s = time.perf_counter() - t0
    st = image.stat()
    cat_s = await trio.to_thread.run_sync(cat_seconds, image, sz.cat_repeats)
    cp_restore_s = await trio.to_thread.run_sync(
        cp_seconds, image, RunDir(rundir).memory_dir / "cp-restore.mem", sz.cat_repeats
    )
    # Restore downtime: from the restore call to the guest unpaused, which is when
    # restore returns (libxl/dm.py: _resume_dm_and_guest is its last step).
    t0 = time.perf_counter()
    restored = await xl.restore(image)
    restore_s = time.perf_counter() - t0
    if await _ram_sha256(xl, restored.domid, sz) != ram:
        raise ValueError(f"{mode} restore {i}: the guest's RAM differs from the saved RAM")
    await xl.destroy(restored.domid)
    cat_cold_s = await trio.to_thread.run_sync(partial(cat_seconds, image, 1, cold=True))
    image.unlink()
    return {
        "image_bytes": st.st_size,
        "image_allocated_bytes": st.st_blocks * 512,
        "pages": saved.pages,
        "save_s": save_s,
        "restore_s": restore_s,
        "save_memory_s": saved.phases["memory"],
        "restore_memory_s": restored.phases["memory"],
        "cat_s": cat_s,
        "memory_file_bytes": mem_bytes,
        "cp_save_s": cp_save_s,
        "cp_restore_s": cp_restore_s,
        "cat_cold_s": cat_cold_s,
        "save_phases": saved.phases,
        "restore_phases": restored.phases,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs and their medians: bandwidths in MiB/s, the downtime and its phases."""

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    def phases(key: str) -> dict[str, float]:
        return {p: statistics.median(r[key][p] for r in runs) for p in runs[0][key]}

    size = med("image_bytes")
    return {
        "runs": runs,
        "image_bytes": size,
        "save_mib_s": size / med("save_s") / MIB,
        "restore_mib_s": size / med("restore_s") / MIB,
        "save_memory_mib_s": size / med("save_memory_s") / MIB,
        "restore_memory_mib_s": size / med("restore_memory_s") / MIB,
        "cat_mib_s": size / med("cat_s") / MIB,
        "cp_save_mib_s": med("memory_file_bytes") / med("cp_save_s") / MIB,
        "cp_restore_mib_s": size / med("cp_restore_s") / MIB,
        "cat_cold_mib_s": size / med("cat_cold_s") / MIB,
        "downtime_s": med("restore_s"),
        "save_phases_s": phases("save_phases"),
        "downtime_phases_s": phases("restore_phases"),
    }


async def _measure(sz: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with scratch_dir("pl-bench-sr-") as work:
        rundir = work / "run"
        async with open_stack(rundir) as stack:
            # open_libxl and the device models it spawns find xenstored through the
            # environment (session.py: rundir_from), so point it at this stack.
            saved = os.environ.get("XENSTORED_PATH")
            os.environ["XENSTORED_PATH"] = str(stack.xenstored_socket)
            try:
                for mode in MODES:
                    out[mode] = await _one_mode(rundir, work, mode, sz)
            finally:
                if saved is None:
                    del os.environ["XENSTORED_PATH"]
                else:
                    os.environ["XENSTORED_PATH"] = saved
    return out


def measure(results: Results, sz: Sizes) -> dict[str, Any]:
    modes = trio.run(_measure, sz)
    guest = f"{sz.memory_mib} MiB + {sz.videoram_mib} MiB VRAM"
    for mode, m in modes.items():
        for what in ("save", "restore"):
            cp = m[f"cp_{what}_mib_s"]
            for key, label in ((what, "whole"), (f"{what}_memory", "memory copy")):
                results.add(
                    Target(
                        "saverestore",
                        f"{what} ({mode}, {label}) / cp bandwidth",
                        ratio(m[f"{key}_mib_s"], cp),
                        "x",
                        "≥ 0.8x",
                        0.8,
                        note=f"{m[f'{key}_mib_s']:,.0f} vs cp {cp:,.0f} MiB/s (cat warm"
                        f" {m['cat_mib_s']:,.0f}, cold {m['cat_cold_mib_s']:,.0f}); {guest}",
                    )
                )
        steps = ", ".join(f"{p} {s * 1000:.0f}" for p, s in m["downtime_phases_s"].items())
        results.add(
            Target(
                "saverestore",
                f"restore downtime ({mode})",
                m["downtime_s"] * 1000,
                "ms",
                "reported",
                note=f"restore start → guest unpaused; ms: {steps}",
            )
        )
    return {"sizes": sz.__dict__, "modes": modes}

"""Issue 7 target 3: save and restore of a 256 MiB guest with 16 MiB of video memory.

The bandwidths are compared with ``cat IMAGE > /dev/null`` taken right after each save in
the same run: page-cache state cannot be reset reliably, so the image is read warm, as the
restore that follows reads it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from physmap_lab.stack import open_stack
from toolstack.config import DomainConfig
from toolstack.libxl import open_libxl

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


def cat_seconds(image: Path, repeats: int) -> float:
    """Median wall time of ``cat image > /dev/null``."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with open("/dev/null", "wb") as null:
            subprocess.run(["cat", str(image)], stdout=null, check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


async def _one_mode(rundir: Path, work: Path, mode: str, sz: Sizes) -> dict[str, Any]:
    runs: list[dict[str, float]] = []
    async with open_libxl(rundir, command="bench") as xl:
        for i in range(sz.repeats):
            config = DomainConfig(
                name=f"bench-{mode}-{i}",
                memory_mib=sz.memory_mib,
                videoram_mib=sz.videoram_mib,
                dm_mode=mode,  # type: ignore[arg-type]
            )
            created = await xl.create(config)
            image = work / f"{mode}-{i}.img"
            t0 = time.perf_counter()
            saved = await xl.save(created.domid, image)
            save_s = time.perf_counter() - t0
            nbytes = image.stat().st_size
            cat_s = await trio.to_thread.run_sync(cat_seconds, image, sz.cat_repeats)
            # Restore downtime: from the restore call to the guest unpaused, which is when
            # restore returns (libxl.py: _resume_dm_and_guest is its last step).
            t0 = time.perf_counter()
            restored = await xl.restore(image)
            restore_s = time.perf_counter() - t0
            await xl.destroy(restored.domid)
            image.unlink()
            runs.append(
                {
                    "image_bytes": nbytes,
                    "pages": saved.pages,
                    "save_s": save_s,
                    "restore_s": restore_s,
                    "cat_s": cat_s,
                }
            )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    size = med("image_bytes")
    return {
        "runs": runs,
        "image_bytes": size,
        "save_mib_s": size / med("save_s") / MIB,
        "restore_mib_s": size / med("restore_s") / MIB,
        "cat_mib_s": size / med("cat_s") / MIB,
        "downtime_s": med("restore_s"),
    }


async def _measure(sz: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with scratch_dir("pl-bench-sr-") as work:
        rundir = work / "run"
        async with open_stack(rundir) as stack:
            # open_libxl and the device models it spawns find xenstored through the
            # environment (libxl.py: rundir_from), so point it at this stack.
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
            results.add(
                Target(
                    "saverestore",
                    f"{what} ({mode}) / cat bandwidth",
                    ratio(m[f"{what}_mib_s"], m["cat_mib_s"]),
                    "x",
                    "≥ 0.5x",
                    0.5,
                    note=f"{m[f'{what}_mib_s']:,.0f} vs cat {m['cat_mib_s']:,.0f} MiB/s; {guest}",
                )
            )
        results.add(
            Target(
                "saverestore",
                f"restore downtime ({mode})",
                m["downtime_s"] * 1000,
                "ms",
                "reported",
                note="restore start → guest unpaused",
            )
        )
    return {"sizes": sz.__dict__, "modes": modes}

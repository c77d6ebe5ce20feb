"""What a case or a run leaves behind: sockets, guest-memory files and device models that should
be gone, and ending such processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path

import trio

import xenhost


def leftover_files(rundir: Path, domids: Iterable[int] | None = None) -> list[Path]:
    """Sockets and guest-memory files still in ``rundir``: of ``domids`` only, or all."""
    if domids is None:
        patterns = ["socket", "hypervisor.sock", "principals/*/*", "domains/*.sock"]
        patterns += ["qmp/*.sock", "mem/*.mem"]
    else:
        patterns = []
        for d in domids:
            patterns += [f"domains/{d}.sock", f"qmp/{d}.sock", f"mem/dom{d}.mem"]
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(rundir.glob(pattern))
    return found


def device_models(rundir: Path, domids: Iterable[int] | None = None) -> list[int]:
    """Pids of ``qemu-model`` processes serving ``rundir`` (for ``domids`` only, if given)."""
    return xenhost.device_models(rundir, domids)


async def end_processes(pids: Sequence[int]) -> None:
    """SIGTERM, a short wait, then SIGKILL: for device models a failed destroy left running."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(5):
        while any(_alive(p) for p in pids):
            await trio.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]

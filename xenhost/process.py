"""Finding the programs of the host and the processes that serve a run directory.

Synchronous and trio-free: async callers poll :func:`accepts` under ``trio.fail_after``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Final

#: The console script of the device model (qemu_model's ``qemu-model``).
DM_PROGRAM: Final = "qemu-model"


def executable(name: str, hint: str = "") -> str:
    """The console script ``name``: beside the running interpreter first (a virtualenv), then
    on PATH; FileNotFoundError "<name> is not installed<hint>" when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed{hint}")
    return found


def accepts(path: str | os.PathLike[str]) -> bool:
    """Whether the unix socket at ``path`` accepts a connection now (a daemon's readiness)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
        return True


def xl_json_argv(
    rundir: str | os.PathLike[str], *args: str, program: str | None = None
) -> list[str]:
    """The command line of ``xl-sim --rundir RUNDIR --json ARGS...``."""
    xl = program if program is not None else executable("xl-sim")
    return [xl, "--rundir", os.fspath(rundir), "--json", *args]


def _option(args: Sequence[str], option: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == option:
            return args[i + 1]
    return None


def device_model_domains(
    rundir: str | os.PathLike[str], domids: Iterable[int] | None = None
) -> dict[int, int]:
    """``qemu-model`` processes serving ``rundir`` (only ``domids``, if given): pid -> domid,
    read from each process's command line in /proc (``--rundir``, ``--domid``).  A process that
    exited but is not yet reaped has an empty command line and is not one."""
    wanted = None if domids is None else {str(d) for d in domids}
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in raw]
        if not any(Path(a).name == DM_PROGRAM for a in args[:2]):
            continue
        if _option(args, "--rundir") != os.fspath(rundir):
            continue
        domid = _option(args, "--domid") or "0"
        if wanted is not None and domid not in wanted:
            continue
        found[int(entry.name)] = int(domid) if domid.isdigit() else 0
    return found


def device_models(rundir: str | os.PathLike[str], domids: Iterable[int] | None = None) -> list[int]:
    """Pids of the ``qemu-model`` processes serving ``rundir``, ascending."""
    return sorted(device_model_domains(rundir, domids))


def stop_device_models(rundir: str | os.PathLike[str], *, grace: float = 3.0) -> list[int]:
    """Stop the device models still serving ``rundir`` (left by a failed run): SIGTERM, up to
    ``grace`` seconds, then SIGKILL.  Returns the pids found."""
    pids = device_models(rundir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and device_models(rundir):
            time.sleep(0.05)
        if not device_models(rundir):
            break
    return pids


def spawn_detached(program: str, argv: Sequence[str], log_path: str | os.PathLike[str]) -> int:
    """Start ``program`` in a new session, stdin from /dev/null and its output appended to
    ``log_path``; returns its pid.  No process object is kept: the pid is all a caller records
    (as libxl records the device model's pid in xenstore)."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            program,
            [program, *argv],
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)

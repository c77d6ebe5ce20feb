"""The device-model process: its command line, spawning it detached, and stopping it.

libxl spawns QEMU in a new session with its output in a log file, records the pid in
``/local/domain/<domid>/image/device-model-pid`` and, on destroy, finds it again by that pid
(``libxl_dm.c``, ``libxl_exec.c``).  The process is not a child the toolstack waits for: the
``xl`` command that created it exits long before it does.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import xenhost
from xenhost.process import DM_PROGRAM as DM_PROGRAM

from .config import DomainConfig


def dm_program() -> str:
    """``qemu-model`` beside the running interpreter first (a virtualenv), then on PATH."""
    return xenhost.executable(DM_PROGRAM)


def dm_argv(
    config: DomainConfig,
    domid: int,
    rundir: str,
    xenstore_path: str,
    hypervisor_path: str,
    *,
    incoming: str | None = None,
) -> list[str]:
    """The device model's arguments (without the program).

    With ``dm_restrict`` libxl passes ``-S`` and learns readiness over QMP, since a restricted
    QEMU cannot write its state node (docs/qemu-physmap.md, 'Start-up and readiness',
    ``libxl_dm.c``).
    """
    argv = [
        "--domid",
        str(domid),
        "--xen-mode",
        config.dm_mode,
        "--qemu-version",
        config.dm_qemu_version,
        "--vga",
        config.vga,
        "--rundir",
        rundir,
        "--xenstore",
        xenstore_path,
        "--hypervisor",
        hypervisor_path,
        "--memory-mib",
        str(config.memory_mib),
        "--vram-mib",
        str(config.vram_mib),
    ]
    vnc = vnc_arg(config)
    if vnc is not None:
        argv += ["--vnc", vnc]
    if config.dm_restrict:
        argv += ["--restrict", "-S"]
    if incoming is not None:
        argv += ["--incoming", incoming]
    return argv


def vnc_arg(config: DomainConfig) -> str | None:
    """QEMU's ``-vnc`` argument as libxl builds it (``libxl_dm.c``,
    ``libxl__build_device_model_args_new``): ``vnclisten`` is taken whole when it names a
    display (it holds a ``:``, which ``unix:PATH`` does too), else ``LISTEN:DISPLAY`` with
    127.0.0.1 and display 0 by default; ``vncunused`` appends ``,to=99``.  libxl passes
    ``-vnc none`` when VNC is off; qemu-model has no VNC unless asked, so nothing is passed."""
    if not config.vnc:
        return None
    listen = "127.0.0.1"
    display = 0
    if config.vncdisplay:
        display = config.vncdisplay
        if config.vnclisten and ":" not in config.vnclisten:
            listen = config.vnclisten
    elif config.vnclisten:
        listen = config.vnclisten
    arg = listen if ":" in listen else f"{listen}:{display}"
    return arg + (",to=99" if config.vncunused and not arg.startswith("unix:") else "")


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is an exited child of ours; True if it was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child of this process is reaped on the way)."""
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def is_device_model(pid: int, domid: int) -> bool:
    """Whether ``pid`` is the device model of ``domid`` (guards against a reused pid)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.split(b"\0")
    if not any(a.endswith(DM_PROGRAM.encode()) for a in args[:2]):
        return False
    try:
        i = args.index(b"--domid")
    except ValueError:
        return False
    return i + 1 < len(args) and args[i + 1] == str(domid).encode()


def send_signal(pid: int, sig: signal.Signals) -> bool:
    """Signal ``pid``; False if it is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


def log_tail(log_path: Path, limit: int = 2000) -> str:
    try:
        return log_path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""

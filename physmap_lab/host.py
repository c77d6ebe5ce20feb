"""``physmap-lab host up NAME`` / ``host down NAME``: one simulated Xen host.

A host is one run directory with its own ``xenstored-sim`` and ``hypervisor-sim``; the device
models its ``xl-sim`` spawns live there too.  ``host up`` starts a supervisor in a session of
its own (so it outlives the command, as a host's daemons outlive a login shell), waits until
both daemons accept, and prints the run directory.  The supervisor keeps the daemons until
SIGTERM: then it destroys every domain still on the host (their device models with them) and
stops the daemons.  ``host down`` sends that SIGTERM and waits for the supervisor to finish.
Its pid is in ``RUNDIR/host.json``.  Run ``host up`` under ``ip netns exec NS`` and the whole
host, its device models and its ``xl-sim migrate-receive`` are in that namespace.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

from toolstack.libxl import ToolstackError, open_libxl
from xenhost import RunDir, spawn_detached

from .ready import accepts
from .stack import open_stack

#: How long ``host up`` waits for the daemons, and ``host down`` for the supervisor.
START_LIMIT_S: Final = 30.0
STOP_LIMIT_S: Final = 60.0


class HostError(Exception):
    """A host could not be started or stopped; the message says why."""


def default_rundir(name: str) -> Path:
    """``$PHYSMAP_LAB_HOSTS/NAME``, else ``<tmp>/physmap-lab-hosts/NAME``."""
    base = os.environ.get("PHYSMAP_LAB_HOSTS") or os.path.join(
        tempfile.gettempdir(), "physmap-lab-hosts"
    )
    return Path(base) / name


def check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise HostError(f"host name {name!r}: use letters, digits, '-', '_' and '.' (not first)")
    return name


def _record(rundir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((rundir / "host.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_pid(rundir: Path) -> int | None:
    """The supervisor's pid when one runs for ``rundir``."""
    rec = _record(rundir)
    pid = rec.get("pid") if rec else None
    return pid if isinstance(pid, int) and _alive(pid) else None


def up(name: str, rundir: Path) -> Path:
    """Start the host's supervisor and return once both daemons accept."""
    check_name(name)
    rundir.mkdir(parents=True, exist_ok=True)
    # Two ``host up`` at once: the second waits here and then finds the first's record.
    lock = os.open(rundir / "host.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start(name, rundir)
    finally:
        os.close(lock)


def _start(name: str, rundir: Path) -> Path:
    if host_pid(rundir) is not None:
        raise HostError(f"host {name} already runs on {rundir} (pid {host_pid(rundir)})")
    (rundir / "host.json").unlink(missing_ok=True)
    log = rundir / "logs" / "host.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = ["-m", "physmap_lab.host", name, str(rundir)]
    pid = spawn_detached(sys.executable, argv, log)
    deadline = time.monotonic() + START_LIMIT_S
    while _record(rundir) is None or not accepts(str(RunDir(rundir).hypervisor_socket)):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
            raise HostError(f"host {name} did not start: {lines[-1]}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
            raise HostError(f"host {name} did not come up in {START_LIMIT_S:.0f} s; see {log}")
        time.sleep(0.02)
    return rundir


def down(name: str, rundir: Path) -> bool:
    """Stop the host; False when none ran there."""
    check_name(name)
    pid = host_pid(rundir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_LIMIT_S
    while _alive(pid):
        with_child = _reap(pid)
        if with_child:
            break
        if time.monotonic() > deadline:
            raise HostError(f"host {name} (pid {pid}) did not stop in {STOP_LIMIT_S:.0f} s")
        time.sleep(0.05)
    return True


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return bool(done)


async def supervise(name: str, rundir: Path) -> None:
    """The supervisor: the daemons until SIGTERM or SIGINT, then every domain destroyed."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_stack(rundir, audit=True):
            record = {"name": name, "pid": os.getpid(), "rundir": str(rundir)}
            (rundir / "host.json").write_text(json.dumps(record) + "\n")
            print(f"host {name} up on {rundir}", flush=True)
            async for _ in signals:
                break
            with trio.move_on_after(STOP_LIMIT_S / 2):
                await _destroy_all(rundir)
    (rundir / "host.json").unlink(missing_ok=True)
    print(f"host {name} down", flush=True)


async def _destroy_all(rundir: Path) -> None:
    try:
        async with open_libxl(rundir, command="host-down") as lx:
            for d in await lx.list_domains():
                try:
                    await lx.destroy(d.domid)
                except ToolstackError as exc:
                    print(f"destroy {d.domid}: {exc}", flush=True)
    except ToolstackError as exc:
        print(f"host down: {exc}", flush=True)


def _main(name: str, rundir: Path) -> int:
    """The supervisor's process: a daemon that will not start ends it with its own line."""
    try:
        trio.run(supervise, name, rundir)
    except (RuntimeError, OSError) as exc:
        # open_stack's message ends with the daemon's own one-line refusal
        print((str(exc).strip().splitlines() or [repr(exc)])[-1], flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(check_name(sys.argv[1]), Path(sys.argv[2])))

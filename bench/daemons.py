"""The daemons under measurement: xenstored-sim and, when present, the C xenstored oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from physmap_lab.ready import accepts
from physmap_lab.stack import executable, terminate, xenstored_command

ROOT = Path(__file__).resolve().parent.parent
# The C xenstored oracle: ../shared/oracle beside the repository, or $PHYSMAP_LAB_ORACLE_DIR.
ORACLE_DIR = Path(os.environ.get("PHYSMAP_LAB_ORACLE_DIR") or ROOT.parent / "shared" / "oracle")
XEN_ROOT = Path(os.environ.get("PHYSMAP_LAB_XEN_ROOT", ROOT / ".cache" / "xen-utils-4.17"))


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


@dataclass
class Xenstored:
    """A running daemon: its socket, its pid, and where test-xenstore for it lives."""

    label: str
    socket: str
    pid: int


def oracle_present() -> bool:
    return (ORACLE_DIR / "start-cxenstored.sh").exists()


def _wait_socket(path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not accepts(path):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"xenstored-sim exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise BenchError(f"xenstored-sim did not open {path} within 30 s")
        time.sleep(0.01)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A short path under /tmp (Unix socket paths are limited to 108 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def xenstored_sim() -> Iterator[Xenstored]:
    """A fresh ``xenstored-sim`` on its own run directory, stopped after."""
    with scratch_dir("pl-bench-xs-") as run:
        argv = xenstored_command(str(run))
        argv[0] = executable(argv[0])
        log = run / "xenstored.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        try:
            sock = str(run / "socket")
            _wait_socket(sock, proc, log)
            yield Xenstored("xenstored-sim", sock, proc.pid)
        finally:
            terminate(proc)


@contextmanager
def c_xenstored() -> Iterator[tuple[Xenstored, dict[str, str]]]:
    """The C xenstored oracle (``../shared/oracle``), started fresh and stopped after."""
    out = subprocess.run(
        ["bash", str(ORACLE_DIR / "start-cxenstored.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep and key.isidentifier():
            env[key] = value.strip("'\"")
    if out.returncode != 0 or "XENSTORED_PID" not in env:
        raise BenchError(f"start-cxenstored.sh failed ({out.returncode}): {out.stderr[-2000:]}")
    try:
        yield Xenstored("C xenstored", env["XENSTORED_PATH"], int(env["XENSTORED_PID"])), env
    finally:
        subprocess.run(
            ["bash", str(ORACLE_DIR / "stop-cxenstored.sh"), env["XS_ORACLE_WORKDIR"], "--clean"],
            capture_output=True,
            check=False,
        )


def find_test_xenstore(oracle_env: dict[str, str] | None) -> tuple[str, str] | None:
    """(binary, LD_LIBRARY_PATH) of Xen's test-xenstore: the project's cache, else the oracle's."""
    ours = XEN_ROOT / "usr/lib/xen-4.17/bin/test-xenstore"
    if ours.exists():
        return str(ours), str(XEN_ROOT / "usr/lib/x86_64-linux-gnu")
    if oracle_env and "XS_ORACLE_LIBEXEC" in oracle_env:
        return (
            os.path.join(oracle_env["XS_ORACLE_LIBEXEC"], "test-xenstore"),
            oracle_env["XS_ORACLE_LIBS"],
        )
    return None


def pin(pid: int, cpus: set[int]) -> dict[int, set[int]]:
    """Pin every thread of ``pid``; returns the old affinities for :func:`unpin`."""
    old: dict[int, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            old[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass
    return old


def unpin(old: dict[int, set[int]]) -> None:
    for tid, cpus in old.items():
        with suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


@contextmanager
def pinned(pids: list[int], cpus: set[int]) -> Iterator[None]:
    """Pin the given processes (0 is this one) to ``cpus`` for the block."""
    saved = [pin(pid or os.getpid(), cpus) for pid in pids]
    try:
        yield
    finally:
        for old in saved:
            unpin(old)


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no MemTotal in /proc/meminfo")

"""Waiting for a device-model process to end (toolstack/libxl/dm.py: wait_exit): woken by the
process's pidfd, for a child of this process and for one it did not start, with nothing left
open and no zombie left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from toolstack import devicemodel
from toolstack.libxl.dm import wait_exit


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _spawn_sleeper() -> int:
    return os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))


async def test_wait_exit_returns_when_a_child_is_killed_and_reaps_it() -> None:
    pid = _spawn_sleeper()
    before = _open_fds()
    ended = trio.Event()

    async def waiter() -> None:
        await wait_exit(pid)
        ended.set()

    with trio.fail_after(10):  # a bound on a hang, not a speed target
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            assert not ended.is_set(), "wait_exit returned while the process still ran"
            os.kill(pid, signal.SIGTERM)
    # Reaped: no zombie of ours is left for the pid.
    assert not Path(f"/proc/{pid}").exists()
    assert _open_fds() == before


async def test_wait_exit_sees_a_process_it_did_not_start_end(tmp_path: Path) -> None:
    # A grandchild, reparented once its parent exits: not ours to waitpid, as a device model
    # started by an earlier xl command is not.
    pidfile = tmp_path / "pid"
    code = (
        "import os, sys\n"
        "pid = os.posix_spawn('/bin/sleep', ['sleep', '60'], {}, setsid=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(pid))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    pid = int(pidfile.read_text())
    assert devicemodel.pid_alive(pid)
    with trio.fail_after(10):  # a bound on a hang, not a speed target
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_exit, pid)
            await trio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
    # The nursery closed, so wait_exit returned.


async def test_wait_exit_of_a_gone_pid_returns_at_once() -> None:
    pid = _spawn_sleeper()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with trio.fail_after(10):
        await wait_exit(pid)


async def test_a_cancelled_wait_closes_its_pidfd() -> None:
    pid = _spawn_sleeper()
    before = _open_fds()
    try:
        with trio.move_on_after(0.05):
            await wait_exit(pid)
        assert _open_fds() == before
        assert devicemodel.pid_alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

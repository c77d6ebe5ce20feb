"""A real ``hypervisor-sim`` process in a temporary run directory."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from xenhost import RunDir

BIN = pathlib.Path(sys.executable).parent


@dataclass
class Daemon:
    rundir: pathlib.Path
    proc: subprocess.Popen[bytes]
    audit: pathlib.Path

    @property
    def sock(self) -> pathlib.Path:
        return RunDir(self.rundir).hypervisor_socket

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(path: pathlib.Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(os.fspath(path))
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{path} never accepted")


def start_daemon(rundir: pathlib.Path, *extra: str) -> Daemon:
    rundir.mkdir(parents=True, exist_ok=True)
    audit = RunDir(rundir).audit_log("hypervisor")
    cmd = [os.fspath(BIN / "hypervisor-sim"), "--rundir", os.fspath(rundir)]
    cmd += ["--audit-log", os.fspath(audit), *extra]
    proc = subprocess.Popen(cmd)
    d = Daemon(rundir, proc, audit)
    try:
        wait_for_socket(d.sock, proc)
    except BaseException:
        d.stop()
        raise
    return d


@pytest.fixture
def spawn(tmp_path: pathlib.Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``hypervisor-sim`` with extra arguments; stopped at teardown."""
    started: list[Daemon] = []

    def start(*extra: str) -> Daemon:
        d = start_daemon(tmp_path / f"run{len(started)}", *extra)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def hypervisor(spawn: Callable[..., Daemon]) -> Daemon:
    return spawn()

"""A restartable ``xenstored-sim --state-dir`` process for the durability tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from physmap_lab.stack import terminate
from xenhost import RunDir

REPO = Path(__file__).resolve().parents[3]
# Bounds fixture waits; times no test.
_START_LIMIT = 20.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kill-rounds",
        type=int,
        default=None,
        help="SIGKILL rounds of the durability test (default: $XS_KILL_ROUNDS or 20)",
    )


@pytest.fixture
def kill_rounds(request: pytest.FixtureRequest) -> int:
    # The option exists only when this directory is named on the command line (pytest reads
    # pytest_addoption from start-up conftests); the environment variable works always.
    value = request.config.getoption("--kill-rounds", default=None)
    if value is None:
        value = int(os.environ.get("XS_KILL_ROUNDS", "20"))
    return int(value)


class StatefulDaemon:
    """One run directory and one state directory; :meth:`start` may be called again after
    :meth:`stop` or :meth:`kill`, and the new process recovers from the state directory."""

    def __init__(self, tmp: Path) -> None:
        self.rundir = tmp / "run"
        self.state = tmp / "state"
        self.socket = RunDir(self.rundir).xenstored_socket
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def guest_socket(self, domid: int) -> Path:
        return RunDir(self.rundir).guest_socket(domid)

    async def start(self, *args: str) -> None:
        assert self.proc is None or self.proc.poll() is not None
        cmd = [sys.executable, "-m", "xenstored_sim", "--rundir", str(self.rundir)]
        cmd += ["--state-dir", str(self.state), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=log)
        with trio.fail_after(_START_LIMIT):
            await wait_connectable(self.socket, self.proc)

    async def wait_guest(self, domid: int) -> None:
        """Wait until the guest socket of ``domid`` accepts."""
        with trio.fail_after(_START_LIMIT):
            await wait_connectable(self.guest_socket(domid), self.proc)

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        return terminate(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


async def wait_connectable(path: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    while True:
        if proc is not None:
            assert proc.poll() is None, "xenstored-sim exited"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            await trio.sleep(0.01)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StatefulDaemon]:
    d = StatefulDaemon(tmp_path)
    yield d
    if d.proc is not None:
        d.stop()

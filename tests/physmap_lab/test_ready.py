"""The daemons' readiness handshake: one ready line, and ``--ready-fd`` closed once ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from physmap_lab.ready import accepts

BIN = Path(sys.executable).parent


def _start(argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start a daemon with a ready pipe; what it wrote there before closing it."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*argv, "--ready-fd", str(w)],
        pass_fds=(w,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        said = pipe.read().decode()  # blocks until the daemon closes its end
    return proc, said


def _stop(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    return out.decode(), err.decode()


@pytest.mark.parametrize(
    ("program", "sock"), [("xenstored-sim", "socket"), ("hypervisor-sim", "hypervisor.sock")]
)
def test_ready_line_comes_when_the_socket_accepts(tmp_path: Path, program: str, sock: str) -> None:
    proc, said = _start([str(BIN / program), "--rundir", str(tmp_path)])
    try:
        # Closed only once ready: the socket accepts with no polling at all.
        assert accepts(str(tmp_path / sock))
        assert said == f"{program}: ready on {tmp_path / sock} (pid {proc.pid})\n"
    finally:
        out, err = _stop(proc)
    assert err.splitlines().count(said.strip()) == 1
    assert said.strip() not in out  # stdout stays C's (-P prints the pid there alone)


def test_a_daemon_that_cannot_start_closes_the_pipe_without_a_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc, said = _start([str(BIN / "hypervisor-sim"), "--rundir", str(blocker)])
    assert said == ""
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.decode().strip(), "the daemon says why it could not start"


@pytest.mark.parametrize("fd", ["1", "57", "x"])
def test_a_bad_ready_fd_is_a_one_line_usage_error(tmp_path: Path, fd: str) -> None:
    proc = subprocess.run(
        [str(BIN / "xenstored-sim"), "--rundir", str(tmp_path), "--ready-fd", fd],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--ready-fd" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr

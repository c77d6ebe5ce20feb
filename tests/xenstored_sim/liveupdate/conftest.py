"""Fixtures of the live-update tests: a daemon process with a state directory and an audit
log, a blocking wire client, and Xen's real ``xenstore-control``."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import xenhost
from physmap_lab.stack import terminate
from xenhost import RunDir
from xenstored_sim.wire import Op

REPO = Path(__file__).resolve().parents[3]
HEADER = struct.Struct("=IIII")
# Bounds process start-up and blocking reads; a correct run takes milliseconds.
_LIMIT = 10.0
# Debian packages holding the libraries xenstore-control links besides libxenstore
# (libxenctrl and libxenguest come in libxenmisc4.17).


class Wire:
    """A blocking xenstore wire client that can pipeline and send partial frames."""

    def __init__(self, path: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(_LIMIT)
        self.sock.connect(str(path))
        self.buf = b""
        self.req_id = 0
        self.events: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def frame(self, op: int, payload: bytes = b"", tx: int = 0) -> bytes:
        self.req_id += 1
        return HEADER.pack(op, self.req_id, tx, len(payload)) + payload

    def recv_msg(self) -> tuple[int, int, int, bytes]:
        while len(self.buf) < 16 or len(self.buf) < 16 + HEADER.unpack_from(self.buf)[3]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the daemon")
            self.buf += chunk
        op, req_id, tx, n = HEADER.unpack_from(self.buf)
        payload = self.buf[16 : 16 + n]
        self.buf = self.buf[16 + n :]
        return op, req_id, tx, payload

    def reply(self, req_id: int) -> bytes | str:
        """The reply to ``req_id``; ERROR replies as the errno name; events are kept."""
        while True:
            op, got, _, body = self.recv_msg()
            if op == Op.WATCH_EVENT:
                self.events.append(body)
                continue
            assert got == req_id, (got, req_id)
            return body.rstrip(b"\0").decode() if op == Op.ERROR else body

    def req(self, op: int, payload: bytes = b"", tx: int = 0) -> bytes | str:
        self.sock.sendall(self.frame(op, payload, tx))
        return self.reply(self.req_id)

    def event(self) -> bytes:
        if self.events:
            return self.events.pop(0)
        op, _, _, body = self.recv_msg()
        assert op == Op.WATCH_EVENT, (op, body)
        return body


@dataclass
class LiveDaemon:
    """A ``xenstored-sim`` process with ``--state-dir`` and ``--audit-log``."""

    proc: subprocess.Popen[bytes]
    rundir: Path
    state_dir: Path
    audit: Path
    log: Path

    @property
    def socket(self) -> str:
        return str(RunDir(self.rundir).xenstored_socket)

    def guest_socket(self, domid: int) -> Path:
        return RunDir(self.rundir).guest_socket(domid)

    def cmdline(self) -> list[str]:
        raw = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        return [part.decode() for part in raw.split(b"\0") if part]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        env["XENSTORED_PATH"] = self.socket
        return env


_accepts = xenhost.accepts


@pytest.fixture
def live_daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    exe = Path(sys.executable).parent / "xenstored-sim"
    rundir, state, audit, log = (
        tmp_path / "run",
        tmp_path / "state",
        tmp_path / "audit.jsonl",
        tmp_path / "daemon.log",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    args = [str(exe), "--rundir", str(rundir), "--state-dir", str(state)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*args, "--audit-log", str(audit)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    daemon = LiveDaemon(proc, rundir, state, audit, log)
    try:
        deadline = time.monotonic() + _LIMIT
        while not _accepts(daemon.socket):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "xenstored-sim never accepted"
            time.sleep(0.02)
        yield daemon
    finally:
        terminate(proc)


@pytest.fixture
def connect() -> Iterator[Callable[[str | Path], Wire]]:
    """Open :class:`Wire` clients; all are closed at teardown."""
    clients: list[Wire] = []

    def open_wire(path: str | Path) -> Wire:
        client = Wire(path)
        clients.append(client)
        return client

    yield open_wire
    for client in clients:
        client.close()


def accepts(path: str) -> bool:
    """Whether a Unix socket accepts connections."""
    return _accepts(path)


@pytest.fixture
def socket_accepts() -> Callable[[str], bool]:
    return accepts


@pytest.fixture(scope="session")
def xenstore_control(xen_root: Path) -> tuple[Path, str]:
    """Xen 4.17's ``xenstore-control`` and the LD_LIBRARY_PATH it runs with."""
    return (
        xen_root / "usr/lib/xen-4.17/bin/xenstore-control",
        str(xen_root / "usr/lib/x86_64-linux-gnu"),
    )

"""Fixtures of the xenstored-sim tests: an engine harness, real daemon processes (sim and the
C oracle), clients, and the unpacked Xen tools."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import xenhost
from physmap_lab.stack import terminate
from xenhost import RunDir
from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.core import ConnKind, Quotas, XenstoreEngine
from xenstored_sim.wire import Op, Packet

REPO = Path(__file__).resolve().parents[2]
ORACLE = REPO.parent / "shared" / "oracle"
HEADER = struct.Struct("=IIII")


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"OP{op}"


class Harness:
    """Drives the pure engine: ``req`` returns the outbox as (conn, type name, payload)."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.engine = XenstoreEngine(quotas, audit=True, clock=lambda: 0.0)
        self.req_id = 0

    def socket(self) -> int:
        return self.engine.connect(ConnKind.SOCKET)

    def guest(self, domid: int) -> int:
        return self.engine.connect(ConnKind.GUEST, domid)

    def out(self, conn: int, op: Op | int, payload: bytes = b"", tx: int = 0):
        self.req_id += 1
        box = self.engine.handle(conn, Packet(int(op), self.req_id, tx, payload))
        return [(c, op_name(p.op), p.payload) for c, p in box]

    def req(self, conn: int, op: Op | int, payload: bytes = b"", tx: int = 0) -> bytes:
        """The reply payload; ERROR replies come back as the errno name (``"ENOENT"``)."""
        mine = [
            m for m in self.out(conn, op, payload, tx) if m[0] == conn and m[1] != "WATCH_EVENT"
        ]
        assert len(mine) == 1
        _, kind, body = mine[0]
        return body.rstrip(b"\0").decode() if kind == "ERROR" else body

    def introduce(self, priv: int, domid: int) -> None:
        assert self.req(priv, Op.INTRODUCE, b"%d\x001\x001\0" % domid) == b"OK\0"


@pytest.fixture
def h() -> Harness:
    return Harness()


class RawConn:
    """A blocking wire client for daemon tests."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.req_id = 0
        self.events: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, op: int, payload: bytes = b"", tx: int = 0) -> int:
        self.req_id += 1
        self.sock.sendall(HEADER.pack(op, self.req_id, tx, len(payload)) + payload)
        return self.req_id

    def recv_msg(self) -> tuple[int, int, int, bytes]:
        while len(self.buf) < 16:
            self._fill()
        op, req_id, tx, n = HEADER.unpack_from(self.buf)
        while len(self.buf) < 16 + n:
            self._fill()
        payload = self.buf[16 : 16 + n]
        self.buf = self.buf[16 + n :]
        return op, req_id, tx, payload

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def req(self, op: int, payload: bytes = b"", tx: int = 0) -> bytes | str:
        """Reply payload, or the errno name of an ERROR; events go to ``events``."""
        rid = self.send(op, payload, tx)
        while True:
            typ, got, _, body = self.recv_msg()
            if typ == Op.WATCH_EVENT:
                self.events.append(body)
                continue
            assert got == rid
            return body.rstrip(b"\0").decode() if typ == Op.ERROR else body

    def event(self) -> bytes:
        if self.events:
            return self.events.pop(0)
        typ, _, _, body = self.recv_msg()
        assert typ == Op.WATCH_EVENT
        return body


class Daemon:
    def __init__(self, rundir: Path, proc: subprocess.Popen[bytes], audit: Path | None) -> None:
        self.rundir = rundir
        self.socket = RunDir(rundir).xenstored_socket
        self.proc = proc
        self.audit = audit
        self.clients: list[RawConn] = []

    def conn(self) -> RawConn:
        client = RawConn(self.socket)
        self.clients.append(client)
        return client

    def guest(self, domid: int) -> RawConn:
        path = RunDir(self.rundir).guest_socket(domid)
        deadline = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.01)
        client = RawConn(path)
        self.clients.append(client)
        return client


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, "xenstored-sim exited"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            assert time.monotonic() < deadline, "xenstored-sim never accepted"
            time.sleep(0.02)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []
    daemons: list[Daemon] = []

    def start(
        *args: str,
        audit: bool = False,
        env: dict[str, str] | None = None,
        socket_path: Path | None = None,
    ) -> Daemon:
        rundir = tmp_path / f"run{len(procs)}"
        audit_path = tmp_path / f"audit{len(procs)}.jsonl" if audit else None
        cmd = [sys.executable, "-m", "xenstored_sim", "--rundir", str(rundir), *args]
        if audit_path:
            cmd += ["--audit-log", str(audit_path)]
        base = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        proc = subprocess.Popen(cmd, cwd=REPO, env={**base, **(env or {})})
        procs.append(proc)
        daemon = Daemon(rundir, proc, audit_path)
        daemons.append(daemon)
        if socket_path is not None:
            daemon.socket = socket_path
        wait_for_socket(daemon.socket, proc)
        return daemon

    yield start
    for daemon in daemons:
        for client in daemon.clients:
            client.close()
    for proc in procs:
        terminate(proc)


# -- Real daemon processes for the client, real-client and differential tests --------------
#
# A fresh ``xenstored-sim`` per test, in tmp_path.  Set ``XENSTORED_SIM_TEST_DAEMON=oracle``
# to run the same tests against the real C xenstored of ``../shared/oracle`` (its guest-socket
# variant) instead: that checks the tests themselves.

DAEMON_KIND = os.environ.get("XENSTORED_SIM_TEST_DAEMON", "sim")
ORACLE_DIR = ORACLE

# Waits for processes started here; they bound fixture set-up, they time no test.
_START_LIMIT = 20.0
_STOP_LIMIT = 10.0


@dataclass
class RunningDaemon:
    """A running xenstore daemon: its privileged socket and its run directory."""

    socket: str
    rundir: Path
    pid: int
    kind: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def guest_socket(self, domid: int) -> str:
        """``RUNDIR/domains/<domid>.sock``, served once the domain is introduced."""
        return str(RunDir(self.rundir).guest_socket(domid))

    def client_env(self) -> dict[str, str]:
        """An environment for libxenstore clients (xenstore-*, test-xenstore, pyxs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        env["XENSTORED_PATH"] = self.socket
        return env

    def kill(self) -> None:
        """SIGKILL the daemon (for tests of a daemon that dies)."""
        os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


_accepts = xenhost.accepts


def _sim_executable() -> str:
    exe = Path(sys.executable).parent / "xenstored-sim"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `make setup` (pip install -e .)")
    return str(exe)


def start_sim(tmp_path: Path, *daemon_args: str) -> RunningDaemon:
    """Start ``xenstored-sim --rundir TMP/run ARGS`` and wait until its socket accepts."""
    rundir = tmp_path / "run"
    log = tmp_path / "xenstored-sim.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [_sim_executable(), "--rundir", str(rundir), *daemon_args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    daemon = RunningDaemon(str(RunDir(rundir).xenstored_socket), rundir, proc.pid, "sim", proc, log)
    deadline = time.monotonic() + _START_LIMIT
    while not _accepts(daemon.socket):
        if proc.poll() is not None:
            pytest.fail(f"xenstored-sim exited {proc.returncode}:\n{daemon.read_log()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"xenstored-sim did not accept on {daemon.socket}:\n{daemon.read_log()}")
        time.sleep(0.02)
    return daemon


def stop_sim(daemon: RunningDaemon) -> None:
    """SIGTERM; the daemon must exit 0 and remove its socket (unless the test killed it)."""
    proc = daemon.process
    assert proc is not None
    if proc.poll() is not None:
        return  # the test killed it
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(_STOP_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"xenstored-sim ignored SIGTERM:\n{daemon.read_log()}")
    assert rc == 0, f"xenstored-sim exited {rc} on SIGTERM:\n{daemon.read_log()}"
    assert not os.path.exists(daemon.socket), "xenstored-sim left its socket behind"


def start_oracle(*daemon_args: str) -> RunningDaemon:
    """Start the real C xenstored with guest sockets (``guests/start-cguest.sh``)."""
    script = ORACLE_DIR / "guests" / "start-cguest.sh"
    out = subprocess.run(
        [str(script), "--", *daemon_args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    daemon = RunningDaemon(
        env["XENSTORED_PATH"],
        Path(env["CGUEST_RUNDIR"]),
        int(env["XENSTORED_PID"]),
        "oracle",
        env=env,
    )
    deadline = time.monotonic() + _START_LIMIT
    while not _accepts(daemon.socket):
        if time.monotonic() > deadline:
            stop_oracle(daemon)
            pytest.fail(f"C xenstored did not accept on {daemon.socket}")
        time.sleep(0.02)
    return daemon


def stop_oracle(daemon: RunningDaemon) -> None:
    workdir = daemon.env["CGUEST_WORKDIR"]
    subprocess.run(
        [str(ORACLE_DIR / "guests" / "stop-cguest.sh"), workdir],
        capture_output=True,
        check=False,
        timeout=60,
    )
    subprocess.run(["rm", "-rf", workdir], check=False)


def _daemon_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    # Extra daemon flags (C xenstored's quota flags) come by indirect parametrisation.
    return tuple(getattr(request, "param", ()))


@pytest.fixture
def xenstored(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """A fresh daemon with an empty store; stopped with SIGTERM afterwards (exit 0, no socket).

    ``@pytest.mark.parametrize("xenstored", [("-E", "8")], indirect=True)`` passes flags.
    """
    if DAEMON_KIND == "oracle":
        daemon = start_oracle(*_daemon_args(request))
        try:
            yield daemon
        finally:
            stop_oracle(daemon)
        return
    daemon = start_sim(tmp_path, *_daemon_args(request))
    try:
        yield daemon
    finally:
        stop_sim(daemon)


@pytest.fixture
def c_xenstored(request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """A fresh real C xenstored 4.17 from ``../shared/oracle``, with guest sockets."""
    if not ORACLE_DIR.is_dir():
        pytest.skip(f"no C xenstored oracle at {ORACLE_DIR}")
    daemon = start_oracle(*_daemon_args(request))
    try:
        yield daemon
    finally:
        stop_oracle(daemon)


@pytest.fixture
async def xs(xenstored: RunningDaemon) -> AsyncIterator[XsClient]:
    """A privileged client of :func:`xenstored`."""
    async with open_xenstore(xenstored.socket) as client:
        yield client


@pytest.fixture(scope="session")
def xen_root() -> Path:
    """Debian's xen-utils-4.17 unpacked (for test-xenstore): ``$PHYSMAP_LAB_XEN_ROOT``, else
    ``.cache/xen-utils-4.17``, fetched by ``scripts/fetch-xen-utils.sh`` if it is not there."""
    root = Path(os.environ.get("PHYSMAP_LAB_XEN_ROOT") or REPO / ".cache" / "xen-utils-4.17")
    if not (root / "usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17").exists():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "fetch-xen-utils.sh"), str(root)],
            cwd=REPO,
            check=True,
            timeout=600,
        )
    return root


@pytest.fixture
def make_harness() -> type[Harness]:
    """The harness class, for tests that need non-default quotas."""
    return Harness

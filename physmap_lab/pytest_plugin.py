"""A pytest plugin: xenstored-sim and the whole simulated host as fixtures for anyone's tests.

Installed with the package (entry point ``pytest11``), so a project that did ``pip install
physmap-lab`` gets these fixtures without a conftest:

``xenstored_sim``
    A running ``xenstored-sim`` in a fresh run directory, one per test.  Its ``env`` is the
    environment libxenstore clients (``xenstore-read`` and friends, pyxs) need: they find the
    daemon through ``XENSTORED_PATH``, as with C xenstored.
``xenstored_sim_args``
    The daemon's extra flags, C xenstored's names (``["-Q", "memory=..."]``, ``["-E", "100"]``).
    Override the fixture, parametrize ``xenstored_sim`` indirectly with a list of flags, or mark
    a test ``@pytest.mark.xenstored_sim_args("-E", "100")``.
``xenstore_client``
    A privileged trio client (:class:`xenstored_sim.client.XsClient`) on that daemon; needs
    pytest-trio.
``xenstore_guest``
    ``async with xenstore_guest(domid) as guest``: introduces ``domid`` if it is not yet, and
    gives a client on that domain's guest socket, which acts as the unprivileged domain.  Needs
    pytest-trio.
``xen_stack``
    xenstored-sim and hypervisor-sim on one run directory, with ``xl(...)`` to run the toolstack.

Daemons are real processes and are stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xenhost import RunDir, accepts, executable, xl_json_argv

#: How long a daemon may take to start; bounds fixture set-up, times no test.
START_LIMIT = 30.0


def _program(name: str) -> str:
    try:
        return executable(name, ": pip install physmap-lab")
    except FileNotFoundError as exc:
        raise pytest.UsageError(str(exc)) from None


_accepts = accepts


@dataclass
class Process:
    """A daemon started by a fixture."""

    name: str
    popen: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, up to 10 s, then SIGKILL; the exit status."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def _ready_line(fd: int, deadline: float) -> str:
    """What the daemon writes to its ``--ready-fd`` pipe: its ready line, or "" at end of file
    (it died, or closed the pipe without a word) or when ``deadline`` passes."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _start(
    name: str, argv: Sequence[str], socket_path: Path, log_path: Path, env: dict[str, str]
) -> Process:
    """Start a daemon and return once it says it is ready on its ``--ready-fd`` pipe; a daemon
    that closes the pipe silently but lives is waited for by polling its socket."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [_program(argv[0]), *argv[1:], "--ready-fd", str(write_end)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(write_end,),
            )
    finally:
        os.close(write_end)  # the daemon holds its own copy now
    proc = Process(name, popen, socket_path, log_path)
    deadline = time.monotonic() + START_LIMIT
    try:
        ready = _ready_line(read_end, deadline)
    finally:
        os.close(read_end)
    while not ready and not _accepts(socket_path):
        if popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            pytest.fail(f"{name} did not start ({' '.join(argv)}):\n{proc.log()[-2000:]}")
        time.sleep(0.01)
    return proc


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}


@dataclass
class XenstoredSim:
    """A running xenstored-sim: where it listens and how clients find it."""

    rundir: Path
    process: Process
    args: tuple[str, ...]

    @property
    def socket_path(self) -> Path:
        return RunDir(self.rundir).xenstored_socket

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def env(self) -> dict[str, str]:
        """The environment of a libxenstore client of this daemon."""
        env = dict(os.environ)
        env["XENSTORED_PATH"] = str(self.socket_path)
        env["XENSTORED_RUNDIR"] = str(self.rundir)
        return env

    def guest_socket(self, domid: int) -> Path:
        """Where an introduced domain's connections arrive (the stand-in for its ring)."""
        return RunDir(self.rundir).guest_socket(domid)


def start_xenstored_sim(rundir: Path, args: Sequence[str] = ()) -> XenstoredSim:
    """Start a xenstored-sim on ``rundir``; stop it with ``.process.stop()``."""
    rundir.mkdir(parents=True, exist_ok=True)
    argv = ["xenstored-sim", "--rundir", str(rundir), *args]
    proc = _start(
        "xenstored-sim",
        argv,
        RunDir(rundir).xenstored_socket,
        rundir / "logs" / "xenstored.log",
        _clean_env(),
    )
    return XenstoredSim(rundir, proc, tuple(args))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "xenstored_sim_args(*flags): extra xenstored-sim flags for this test"
    )


@pytest.fixture
def xenstored_sim_args(request: pytest.FixtureRequest) -> list[str]:
    """Extra flags for ``xenstored_sim``: from the marker, or none."""
    marker = request.node.get_closest_marker("xenstored_sim_args")
    return [str(a) for a in marker.args] if marker is not None else []


@pytest.fixture
def xenstored_sim(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    xenstored_sim_args: list[str],
) -> Iterator[XenstoredSim]:
    """A fresh xenstored-sim for one test."""
    args = list(getattr(request, "param", None) or xenstored_sim_args)
    daemon = start_xenstored_sim(tmp_path_factory.mktemp("xenstored-sim") / "run", args)
    try:
        yield daemon
    finally:
        daemon.process.stop()


@pytest.fixture
async def xenstore_client(xenstored_sim: XenstoredSim) -> AsyncIterator[Any]:
    """A privileged trio client on ``xenstored_sim``."""
    from xenstored_sim.client import open_xenstore

    async with open_xenstore(str(xenstored_sim.socket_path)) as xs:
        yield xs


@pytest.fixture
async def xenstore_guest(
    xenstored_sim: XenstoredSim,
) -> AsyncIterator[Callable[[int], AbstractAsyncContextManager[Any]]]:
    """Guest connections: ``async with xenstore_guest(domid) as guest: ...``.

    The connection is opened and closed in the test's own task (a trio client runs a nursery,
    which must be entered and left by the same task)."""
    import trio

    from xenstored_sim.client import open_xenstore

    async with open_xenstore(str(xenstored_sim.socket_path)) as admin:

        @asynccontextmanager
        async def open_guest(domid: int) -> AsyncIterator[Any]:
            if not await admin.is_domain_introduced(domid):
                await admin.introduce(domid, 1, 1)
            path = xenstored_sim.guest_socket(domid)
            while not path.exists():
                await trio.sleep(0.01)
            async with open_xenstore(str(path)) as guest:
                yield guest

        yield open_guest


@dataclass
class XenStack:
    """xenstored-sim and hypervisor-sim on one run directory."""

    rundir: Path
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XENSTORED_PATH"] = str(RunDir(self.rundir).xenstored_socket)
        env["XENSTORED_RUNDIR"] = str(self.rundir)
        return env

    def xl(self, *args: str) -> Any:
        """``xl-sim --json ARGS`` on this stack: its JSON answer; a failure raises."""
        out = subprocess.run(
            xl_json_argv(self.rundir, *args, program=_program("xl-sim")),
            env=self.env,
            capture_output=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"xl-sim {' '.join(args)} exited {out.returncode}: {out.stderr.decode().strip()}"
            )
        return json.loads(out.stdout or b"null")

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()


@pytest.fixture
def xen_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenStack]:
    """A whole simulated host for one test; device models are started by ``xl("create", ...)``."""
    rundir = tmp_path_factory.mktemp("xen-stack") / "run"
    stack = XenStack(rundir)
    try:
        stack.processes["xenstored"] = start_xenstored_sim(rundir).process
        stack.processes["hypervisor"] = _start(
            "hypervisor-sim",
            ["hypervisor-sim", "--rundir", str(rundir)],
            RunDir(rundir).hypervisor_socket,
            rundir / "logs" / "hypervisor.log",
            stack.env,
        )
        yield stack
    finally:
        for domid in _domids(stack):
            subprocess.run(
                [_program("xl-sim"), "--rundir", str(rundir), "destroy", str(domid)],
                env=stack.env,
                capture_output=True,
                check=False,
            )
        stack.stop()


def _domids(stack: XenStack) -> list[int]:
    try:
        listed = stack.xl("list")
    except (RuntimeError, ValueError, pytest.UsageError):
        return []
    return [int(d["domid"]) for d in listed.get("domains", []) if int(d["domid"]) != 0]

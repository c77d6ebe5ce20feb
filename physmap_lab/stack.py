"""Start and stop the daemons of a simulated Xen host, each a real process.

The commands here are the single source of truth for how each service is started: the local
launcher runs them, and ``compose.yaml`` runs the same ones (a test keeps the two in step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import xenhost
from xenhost import PRINCIPALS, RunDir, accepts

__all__ = [
    "PRINCIPALS",
    "Daemon",
    "Stack",
    "XlFailed",
    "XlSim",
    "executable",
    "principal_socket",
]


def executable(name: str) -> str:
    """The console script ``name``: beside the running interpreter first, then on PATH."""
    return xenhost.executable(name, " (run `make setup`)")


def principal_socket(rundir: str, principal: str, daemon: str) -> str:
    """``RUNDIR/principals/<principal>/socket`` (xenstored) or ``.../hypervisor.sock``."""
    return str(RunDir(rundir).principal_socket(principal, daemon))


def _principal_args(rundir: str, daemon: str) -> list[str]:
    args: list[str] = []
    for principal in PRINCIPALS:
        args += ["--principal-socket", f"{principal}={principal_socket(rundir, principal, daemon)}"]
    return args


def xenstored_command(
    rundir: str, *, audit: bool = False, principals: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    cmd = ["xenstored-sim", "--rundir", rundir]
    if audit:
        cmd += ["--audit-log", str(RunDir(rundir).audit_log("xenstored"))]
    if principals:
        cmd += _principal_args(rundir, "xenstored")
    return [*cmd, *extra]


def hypervisor_command(
    rundir: str, *, audit: bool = False, principals: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    cmd = ["hypervisor-sim", "--rundir", rundir]
    if audit:
        cmd += ["--audit-log", str(RunDir(rundir).audit_log("hypervisor"))]
    if principals:
        cmd += _principal_args(rundir, "hypervisor")
    return [*cmd, *extra]


def demo_command(rundir: str) -> list[str]:
    """The toolstack service: the demo, attached to daemons that already run on ``rundir``."""
    return ["physmap-lab", "demo", "--rundir", rundir, "--attach", "--json"]


def service_commands(rundir: str) -> dict[str, list[str]]:
    """Every service of the stack by name, as both the launcher and ``compose.yaml`` run it."""
    return {
        "xenstored": xenstored_command(rundir, audit=True),
        "hypervisor": hypervisor_command(rundir, audit=True),
        "toolstack": demo_command(rundir),
    }


@dataclass
class Daemon:
    """A running daemon process and the socket that says it is ready."""

    name: str
    argv: list[str]
    socket_path: Path
    log_path: Path
    process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@dataclass
class Stack:
    rundir: Path
    daemons: dict[str, Daemon] = field(default_factory=dict)
    #: The daemons serve a socket of their own to each of :data:`PRINCIPALS`.
    principals: bool = True

    @classmethod
    def attach(cls, rundir: Path) -> Stack:
        """The stack whose daemons already run on ``rundir``, with principal sockets or not."""
        own = Path(principal_socket(str(rundir), PRINCIPALS[0], "xenstored"))
        return cls(rundir, principals=own.is_socket())

    @property
    def xenstored_socket(self) -> Path:
        return RunDir(self.rundir).xenstored_socket

    @property
    def hypervisor_socket(self) -> Path:
        return RunDir(self.rundir).hypervisor_socket

    def env(self) -> dict[str, str]:
        """The environment for the toolstack on this stack: libxenstore honours
        XENSTORED_PATH, and ``xl-sim`` finds its own sockets and its device models' in
        PHYSMAP_LAB_PRINCIPALS."""
        env = dict(os.environ)
        env["XENSTORED_PATH"] = str(self.xenstored_socket)
        env.pop("PHYSMAP_LAB_PRINCIPALS", None)
        if self.principals:
            run = str(self.rundir)
            env["XENSTORED_PATH"] = principal_socket(run, "toolstack", "xenstored")
            env["PHYSMAP_LAB_PRINCIPALS"] = str(RunDir(run).principals_dir)
        env["XENSTORED_RUNDIR"] = str(self.rundir)
        env["PHYSMAP_LAB_RUNDIR"] = str(self.rundir)
        return env


async def start_daemon(daemon: Daemon, env: Mapping[str, str] | None = None) -> None:
    """Spawn ``daemon`` and return once it is ready.

    The daemon says so on a ``--ready-fd`` pipe (xenstored_sim/ready.py); one that closes the
    pipe without a word yet lives is waited for by polling its socket.  Raises
    :class:`RuntimeError` with the tail of its log if it exits first.
    """
    argv = [executable(daemon.argv[0]), *daemon.argv[1:]]
    daemon.log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        with open(daemon.log_path, "ab") as log:
            daemon.process = await trio.lowlevel.open_process(
                [*argv, "--ready-fd", str(write_end)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(env) if env is not None else None,
                pass_fds=(write_end,),
            )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the daemon holds its own copy now
    async with trio.lowlevel.FdStream(read_end) as pipe:
        said = b""
        while not said.endswith(b"\n"):
            chunk = await pipe.receive_some()
            if not chunk:
                break
            said += chunk
    while not said and not accepts(str(daemon.socket_path)):
        if daemon.process.poll() is not None:
            tail = daemon.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{daemon.name} exited with {daemon.process.returncode}:\n{tail}")
        await trio.sleep(0.01)


def terminate(proc: subprocess.Popen[bytes]) -> int:
    """Stop a child process started with :mod:`subprocess`: SIGTERM, up to 10 s, then SIGKILL.

    Returns its exit status.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def stop_daemon(daemon: Daemon) -> int | None:
    """Stop a daemon started by :func:`start_daemon`; its exit status."""
    if daemon.process is None:
        return None
    return await stop_process(daemon.process)


async def stop_process(proc: trio.Process) -> int:
    """SIGTERM, up to 10 s, then SIGKILL, shielded from cancellation.  Returns the exit status."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return await proc.wait()


@asynccontextmanager
async def open_stack(
    rundir: str | os.PathLike[str],
    *,
    audit: bool = False,
    principals: bool = True,
    xenstored_args: Sequence[str] = (),
    hypervisor_args: Sequence[str] = (),
) -> AsyncIterator[Stack]:
    """Run ``xenstored-sim`` and ``hypervisor-sim`` on ``rundir`` for the duration of the block.

    With ``principals`` (the default) each daemon also serves a socket of its own to each of
    :data:`PRINCIPALS`, and :meth:`Stack.env` points the toolstack at them.
    """
    root = Path(rundir)
    root.mkdir(parents=True, exist_ok=True)
    if audit:
        RunDir(root).audit_dir.mkdir(exist_ok=True)
    stack = Stack(root, principals=principals)
    run = str(root)
    stack.daemons["xenstored"] = Daemon(
        "xenstored",
        xenstored_command(run, audit=audit, principals=principals, extra=xenstored_args),
        stack.xenstored_socket,
        root / "logs" / "xenstored.log",
    )
    stack.daemons["hypervisor"] = Daemon(
        "hypervisor",
        hypervisor_command(run, audit=audit, principals=principals, extra=hypervisor_args),
        stack.hypervisor_socket,
        root / "logs" / "hypervisor.log",
    )
    try:
        await start_daemon(stack.daemons["xenstored"])
        # The hypervisor's guest actors reach xenstore through the guest sockets.
        await start_daemon(stack.daemons["hypervisor"], env=stack.env())
        yield stack
    finally:
        for name in ("hypervisor", "xenstored"):
            await stop_daemon(stack.daemons[name])


class XlFailed(Exception):
    """``xl-sim`` exited non-zero where success was expected."""


class XlSim:
    """``xl-sim --json`` run against one stack, as the separate process it is."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.rundir = stack.rundir

    def argv(self, *args: str) -> list[str]:
        return xenhost.xl_json_argv(self.rundir, *args, program=executable("xl-sim"))

    async def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        """Exit status, the parsed JSON on stdout (``{}`` when empty) and stderr."""
        proc = await trio.run_process(
            self.argv(*args),
            env=self.stack.env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = proc.stdout.decode().strip()
        return proc.returncode, json.loads(out) if out else {}, proc.stderr.decode()

    async def __call__(self, *args: str) -> dict[str, Any]:
        rc, out, err = await self.run(*args)
        if rc != 0:
            raise XlFailed(f"xl-sim {' '.join(args)} failed ({rc}): {err}")
        return out

    async def start(self, *args: str) -> trio.Process:
        """``xl-sim ARGS`` started with its output on pipes, for :func:`communicate`."""
        return await trio.lowlevel.open_process(
            self.argv(*args),
            env=self.stack.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


async def communicate(proc: trio.Process) -> tuple[int, dict[str, Any], str]:
    """Read a process started by :meth:`XlSim.start` to its end: exit status, parsed JSON
    stdout and stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    chunks: dict[str, bytearray] = {"out": bytearray(), "err": bytearray()}

    async def drain(name: str, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(1 << 16):
            chunks[name] += chunk

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, "out", proc.stdout)
        nursery.start_soon(drain, "err", proc.stderr)
    rc = await proc.wait()
    out = bytes(chunks["out"]).strip()
    return rc, json.loads(out) if out else {}, bytes(chunks["err"]).decode()

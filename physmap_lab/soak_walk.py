"""The model and the stack of the whole-stack random walk (:mod:`physmap_lab.soak`).

A :class:`Walk` holds the real processes it started, the model of what should exist, and the
checks that compare the two; :func:`walk_stack` gives a fresh one that leaves nothing behind.
The steps themselves are in :mod:`physmap_lab.soak_steps`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from toolstack import cli as toolstack_cli
from xenhost import RunDir, accepts, device_models

from .stack import executable, hypervisor_command, xenstored_command

MODE: Final = ("--width", "320", "--height", "200", "--bpp", "32")
#: Devices and modes whose framebuffer is not expected to survive a save and restore.
CORRUPTS: Final = {("pointer-fixup", "qxl")}
MAX_DOMAINS: Final = 4


class WalkFailure(AssertionError):
    """An invariant did not hold."""


@dataclass
class Domain:
    name: str
    vga: str
    mode: str
    paused: bool = False
    mapped: bool = False
    fb: str | None = None  # sha256 of the framebuffer the guest drew
    dm_alive: bool = True


@dataclass
class Image:
    path: Path
    dom: Domain


@dataclass
class Run:
    argv: list[str]
    rc: int
    out: dict[str, Any]
    err: str


@dataclass
class Walk:
    """The stack, its model and the random source of one walk."""

    root: Path
    seed: int
    rng: random.Random = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    domains: dict[int, Domain] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    #: domids whose device model was SIGKILLed and whose domain then died with the
    #: hypervisor: nobody is left to remove their QMP socket until the domid is reused
    stale_qmp: set[int] = field(default_factory=set)
    counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.run = self.root / "run"
        self.state = self.root / "xenstored-state"
        self.run.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- processes

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            XENSTORED_PATH=str(RunDir(self.run).xenstored_socket),
            XENSTORED_RUNDIR=str(self.run),
            PHYSMAP_LAB_RUNDIR=str(self.run),
        )
        return env

    def daemon_argv(self, name: str) -> tuple[list[str], Path]:
        if name == "xenstored":
            cmd = xenstored_command(str(self.run), extra=["--state-dir", str(self.state)])
            return cmd, RunDir(self.run).xenstored_socket
        return hypervisor_command(str(self.run)), RunDir(self.run).hypervisor_socket

    def start(self, name: str) -> None:
        argv, sock = self.daemon_argv(name)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [executable(argv[0]), *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env(),
                start_new_session=True,
            )
        self.procs[name] = proc
        deadline = time.monotonic() + 30
        while not accepts(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise WalkFailure(f"{name} did not start (status {proc.poll()})")
            time.sleep(0.02)

    def xl(self, *args: str, during: Callable[[], None] | None = None) -> Run:
        argv = ["--rundir", str(self.run), "--json", *args]
        rc, stdout, err = run_forked(toolstack_cli.main, argv, self.env(), self.root, during)
        text = stdout.strip()
        try:
            out = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise WalkFailure(f"xl-sim {' '.join(args)}: stdout is not JSON: {text!r}") from None
        run = Run(list(args), rc, out, err)
        self.check_output(run)
        return run

    @staticmethod
    def check_output(run: Run) -> None:
        what = f"xl-sim {' '.join(run.argv)}"
        if "Traceback" in run.err or "ExceptionGroup" in run.err:
            raise WalkFailure(f"{what} printed a traceback:\n{run.err}")
        if run.rc not in (0, 1):
            raise WalkFailure(f"{what} exited {run.rc}:\n{run.err}")
        # A failure is said on one line; a device model's death may add its log's tail.
        if run.rc == 1 and not run.err.startswith("xl-sim: error: "):
            raise WalkFailure(f"{what} failed without an error line on stderr:\n{run.err}")
        if run.rc == 1 and "log" not in run.err and len(run.err.strip().splitlines()) != 1:
            raise WalkFailure(f"{what} failed with more than one line on stderr:\n{run.err}")

    def must(self, *args: str) -> dict[str, Any]:
        run = self.xl(*args)
        if run.rc != 0:
            raise WalkFailure(f"xl-sim {' '.join(args)} failed: {run.err.strip()}")
        return run.out

    def must_fail(self, *args: str) -> Run:
        run = self.xl(*args)
        if run.rc == 0:
            raise WalkFailure(f"xl-sim {' '.join(args)} succeeded; expected a failure")
        return run

    def up(self) -> bool:
        return all(self.alive(n) for n in ("xenstored", "hypervisor"))

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def add(self, domid: int, dom: Domain) -> None:
        if domid in self.domains:
            raise WalkFailure(f"domid {domid} given out again; the model already has it")
        self.domains[domid] = dom
        self.stale_qmp.discard(domid)

    def lose_domains(self) -> None:
        """The hypervisor died: every domain with it."""
        self.stale_qmp |= {d for d, dom in self.domains.items() if not dom.dm_alive}
        self.domains.clear()

    def pick(self) -> tuple[int, Domain] | None:
        if not self.domains:
            return None
        domid = self.rng.choice(sorted(self.domains))
        return domid, self.domains[domid]

    # ---------------------------------------------------------------- invariants

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise WalkFailure(f"{name} died (status {proc.returncode})")
        for name in ("xenstored", "hypervisor"):
            sock = self.daemon_argv(name)[1]
            if not accepts(sock):
                raise WalkFailure(f"{name} does not answer on {sock}")
        mem = {p.name for p in RunDir(self.run).memory_dir.glob("*.mem")}
        if mem != {f"dom{d}.mem" for d in self.domains}:
            raise WalkFailure(f"guest-memory files {sorted(mem)}, domains {sorted(self.domains)}")
        qmp = {p.name for p in RunDir(self.run).qmp_dir.glob("*.sock")}
        if not qmp <= {f"{d}.sock" for d in (*self.domains, *self.stale_qmp)}:
            raise WalkFailure(f"QMP sockets {sorted(qmp)} for domains {sorted(self.domains)}")
        listed = self.must("list")["domains"]
        got = {int(d["domid"]): (d["name"], bool(d["paused"])) for d in listed}
        want = {domid: (d.name, d.paused) for domid, d in self.domains.items()}
        if got != want:
            raise WalkFailure(f"xl-sim list shows {got}, the model {want}")

    def check_fb(self, domid: int, dom: Domain) -> None:
        if dom.fb is None or dom.paused or not dom.dm_alive:
            return
        got = self.must("guest", str(domid), "fb-hash", *MODE)["sha256"]
        if got != dom.fb:
            raise WalkFailure(f"domain {domid} ({dom.mode}/{dom.vga}): framebuffer changed")

    def final_check(self) -> None:
        """Nothing is left: no device model, no socket, no guest-memory file."""
        for domid in sorted(self.domains):
            self.must("destroy", str(domid))
        self.domains.clear()
        for name in ("hypervisor", "xenstored"):
            stop(self.procs.pop(name))
        stale = {RunDir(self.run).qmp_socket(d) for d in self.stale_qmp}
        left = [
            p
            for p in self.run.rglob("*")
            if (p.is_socket() and (p not in stale or accepts(p))) or p.suffix == ".mem"
        ]
        if left:
            raise WalkFailure(f"left behind: {[str(p) for p in left]}")
        dms = device_models(self.run)
        if dms:
            raise WalkFailure(f"device models still running: {dms}")


def run_forked(
    main: Callable[[list[str]], object],
    argv: list[str],
    env: dict[str, str],
    tmp: Path,
    during: Callable[[], None] | None = None,
) -> tuple[int, str, str]:
    """Run a console script's ``main`` in a child process of its own (forked from this one,
    which has imported it already: a new process per command without the interpreter's
    start-up), calling ``during`` while it runs.  Returns its exit status, stdout, stderr."""
    out_path, err_path = tmp / ".xl.out", tmp / ".xl.err"
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                # sys.stdout may not be fd 1 (pytest captures it): print to the files.
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.environ.clear()
                os.environ.update(env)
                main(argv)
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        if during is not None:
            during()
        status = _wait(pid, 120)
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(), err.read().decode(errors="replace")


def _wait(pid: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise WalkFailure(f"xl-sim (pid {pid}) did not finish in {limit:.0f} s")
        time.sleep(0.005)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise WalkFailure(f"pid {proc.pid} ignored SIGTERM") from None


def kill_device_models(run: Path) -> None:
    for pid in device_models(run):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def walk_stack(seed: int, root: Path | None = None) -> Iterator[Walk]:
    """A fresh stack in a temporary directory; every process it started is gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        walk = Walk(Path(root or tmp), seed)
        try:
            walk.start("xenstored")
            walk.start("hypervisor")
            yield walk
        finally:
            for proc in walk.procs.values():
                with suppress(WalkFailure):
                    stop(proc)
            kill_device_models(walk.run)

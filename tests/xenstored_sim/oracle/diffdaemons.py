"""The two daemons of the random differential run: C xenstored 4.17 from ``../shared/oracle``
(with its guest-ring shim and ring bridge, so introduced domains get ``RUNDIR/domains/<domid>.sock``
as with xenstored-sim) and xenstored-sim.  Both are started, watched and stopped by pid only.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# ``../shared/oracle`` next to the repository; XS_ORACLE_DIR names another place.
ORACLE = Path(os.environ.get("XS_ORACLE_DIR") or REPO.parent / "shared" / "oracle")


def oracle_present() -> bool:
    return (ORACLE / "guests" / "xsshim-rings.c").is_file()


def accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Daemon:
    """A running daemon: its privileged socket and where its guest sockets appear."""

    kind = "?"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"xsdiff-{self.kind}-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def rundir(self) -> Path:
        return self.workdir / "run"

    @property
    def socket(self) -> str:
        return str(self.rundir / "socket")

    def guest_socket(self, domid: int) -> str:
        return str(self.rundir / "domains" / f"{domid}.sock")

    def alive(self) -> bool:
        return bool(self.procs) and self.procs[0].poll() is None

    def _wait_socket(self) -> None:
        deadline = time.monotonic() + 20
        while not accepts(self.socket):
            if not self.alive() or time.monotonic() > deadline:
                log = (self.workdir / "daemon.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"{self.kind} daemon did not start:\n{log}")
            time.sleep(0.01)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        shutil.rmtree(self.workdir, ignore_errors=True)


class CDaemon(Daemon):
    """C xenstored as ``guests/start-cguest.sh`` runs it, minus the per-start compile."""

    kind = "c"
    _shim: Path | None = None
    _root: Path | None = None

    @classmethod
    def _prepare(cls) -> tuple[Path, Path]:
        if cls._shim is None or cls._root is None:
            cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"xs-oracle-cache-{os.getuid()}"
            root = Path(os.environ.get("XS_ORACLE_ROOT", cache / "root"))
            if not (root / "usr/lib/xen-4.17/bin/xenstored").exists():
                # start-cguest.sh fills the package cache once
                out = subprocess.run(
                    [str(ORACLE / "guests" / "start-cguest.sh")],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=600,
                ).stdout
                env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                subprocess.run(
                    [str(ORACLE / "guests" / "stop-cguest.sh"), env["CGUEST_WORKDIR"]], check=False
                )
            shim_dir = Path(tempfile.mkdtemp(prefix="xsdiff-shim-"))
            atexit.register(shutil.rmtree, shim_dir, True)
            shim = shim_dir / "xsshim-rings.so"
            subprocess.run(
                [
                    "gcc",
                    "-O2",
                    "-shared",
                    "-fPIC",
                    "-o",
                    str(shim),
                    str(ORACLE / "guests" / "xsshim-rings.c"),
                    "-ldl",
                ],
                check=True,
            )
            cls._shim, cls._root = shim, root
        return cls._shim, cls._root

    def __init__(self, *flags: str) -> None:
        super().__init__()
        shim, root = self._prepare()
        self.rundir.mkdir()
        rings = self.workdir / "rings"
        rings.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        env.update(
            XENSTORED_RUNDIR=str(self.rundir),
            XENSTORED_PATH=self.socket,
            XSSHIM_RINGDIR=str(rings),
            LD_LIBRARY_PATH=str(root / "usr/lib/x86_64-linux-gnu"),
            LD_PRELOAD=str(shim),
        )
        exe = root / "usr/lib/xen-4.17/bin/xenstored"
        with (self.workdir / "daemon.log").open("wb") as log:
            cmd = [str(exe), "-N", "-F", str(self.rundir / "xenstored.pid"), *flags]
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )
        self._wait_socket()
        bridge = [sys.executable, str(ORACLE / "guests" / "ring-bridge.py")]
        bridge += ["--rings", str(rings), "--rundir", str(self.rundir)]
        with (self.workdir / "bridge.log").open("wb") as log:
            self.procs.append(
                subprocess.Popen(bridge, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )


class SimDaemon(Daemon):
    kind = "sim"

    def __init__(self, *flags: str) -> None:
        super().__init__()
        exe = Path(sys.executable).parent / "xenstored-sim"
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        with (self.workdir / "daemon.log").open("wb") as log:
            cmd = [str(exe), "--rundir", str(self.rundir), *flags]
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )
        self._wait_socket()


def start(kind: str) -> Daemon:
    return CDaemon() if kind == "c" else SimDaemon()

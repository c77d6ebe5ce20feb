"""``physmap-lab demo --migrate``: each mode x device as a live migration between two hosts.

Two hosts (``physmap-lab host up``, physmap_lab/host.py) run in two network namespaces joined by
a veth pair when this machine allows it (root and iproute2; physmap_lab/netns.py), otherwise
side by side on 127.0.0.1.  For each case:

1. ``xl-sim create`` on the source host; the guest maps the VGA BAR, sets a mode and draws;
2. ``xl-sim migrate-receive`` on the destination host listens on its address;
3. the guest keeps drawing, a new pattern per frame, while ``xl-sim migrate`` pre-copies the
   memory across; the last frame whose draw returned before the suspend is the one that must
   arrive (a draw after the suspend fails: the vCPU is paused);
4. on the destination, the framebuffer as the guest reads it (``xl-sim guest fb-hash``) and as
   the device model shows it (QMP ``x-physmap-info``) must be that frame, and the physmap keys
   in each host's xenstore (and who touched them, from each host's audit log) are recorded.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from toolstack.qmp import QmpError, QmpProtocolError, open_qmp
from xenhost import RunDir, xl_json_argv
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

from . import host, netns
from .auditlog import AuditFormatError, read_xenstored
from .demo import BAR_ADDR, BPP, GUEST_MEMORY_MIB, HEIGHT, WIDTH, Case, pattern_sha256
from .stack import executable

#: Time between two frames of the drawing guest.
FRAME_INTERVAL_S: Final = 0.02
#: A bound on one migration and on one toolstack step.
STEP_LIMIT_S: Final = 120.0


@dataclass(frozen=True)
class Host:
    name: str
    rundir: Path
    address: str
    ns: netns.Netns | None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return self.ns.wrap(argv) if self.ns is not None else list(argv)

    def xl(self, *args: str) -> list[str]:
        return self.wrap(xl_json_argv(self.rundir, *args, program=executable("xl-sim")))


@asynccontextmanager
async def two_hosts(base: Path, *, tag: str, use_netns: bool = True) -> AsyncIterator[list[Host]]:
    """Hosts ``src`` and ``dst`` under ``base``, each in its own namespace when possible."""
    with _namespaces(tag, use_netns) as spaces:
        hosts = [
            Host(name, base / name, ns.address if ns else "127.0.0.1", ns)
            for name, ns in zip(("src", "dst"), spaces, strict=True)
        ]
        started: list[Host] = []
        try:
            for h in hosts:
                argv = h.wrap([executable("physmap-lab"), "host", "up", h.name])
                await _run([*argv, "--rundir", str(h.rundir)])
                started.append(h)
            yield hosts
        finally:
            with trio.CancelScope(shield=True):
                for h in started:
                    await trio.to_thread.run_sync(host.down, h.name, h.rundir)


@contextmanager
def _namespaces(tag: str, use_netns: bool) -> Any:
    if use_netns and netns.available() is None:
        with netns.veth_pair(tag, subnet=77 + os.getpid() % 150) as pair:
            yield list(pair)
    else:
        yield [None, None]


async def _run(argv: Sequence[str]) -> dict[str, Any]:
    """Run one command; its JSON output (``{}`` when it prints none)."""
    with trio.fail_after(STEP_LIMIT_S):
        proc = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        # the caller adds its own "physmap-lab: error:" in front
        line = err[-1].removeprefix("physmap-lab: error: ") if err else ""
        raise RuntimeError(line or f"{argv[0]} exited with {proc.returncode}")
    text = proc.stdout.decode(errors="replace").strip()
    return json.loads(text.splitlines()[-1]) if text.startswith("{") else {}


@dataclass
class MigrationCase:
    """One object of ``{"runs": [...]}`` for ``demo --migrate``."""

    mode: str
    device: str
    toolstack: str
    ok: bool = False
    migrated: bool = False
    error: str | None = None
    source_host: str = ""
    destination_host: str = ""
    network: str = "loopback"
    #: The network namespaces of the two hosts (none on loopback), removed after the run.
    namespaces: list[str] = field(default_factory=list)
    precopy_rounds: int = 0
    pages_sent: int = 0
    pages_per_round: list[int] = field(default_factory=list)
    downtime_s: float | None = None
    total_s: float | None = None
    frames_drawn: int = 0
    fb_sha256_expected: str | None = None
    fb_sha256_guest: str | None = None
    fb_sha256_dm: str | None = None
    #: Whether the pointers the destination's card derived from its VRAM pointer (QXL's RAM
    #: header and rings) still point into the VRAM (QMP ``x-physmap-info``).
    derived_ptrs_valid: bool | None = None
    image_records: list[str] = field(default_factory=list)
    physmap_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    physmap_xenstore_ops: dict[str, dict[str, int]] = field(default_factory=dict)
    source_domid: int | None = None
    destination_domid: int | None = None
    #: Wall-clock (``time.time``) start and end of each step (create, map, migrate, verify,
    #: destroy), to cut the hosts' audit logs by step; not part of the JSON.
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["spans"]
        return out


@contextmanager
def _span(r: MigrationCase, step: str) -> Iterator[None]:
    """Record the wall-clock span of ``step`` in ``r.spans``, whether it succeeds or not."""
    w0 = time.time()
    try:
        yield
    finally:
        r.spans[step] = (w0, time.time())


class Drawer:
    """The guest drawing a new frame every :data:`FRAME_INTERVAL_S` until it cannot."""

    def __init__(self, h: Host, domid: int, device: str, seed: int) -> None:
        self.h, self.domid, self.device = h, domid, device
        self.last_seed = seed
        self.frames = 0

    async def run(self, stop: trio.Event) -> None:
        params = {"width": WIDTH, "height": HEIGHT, "bpp": BPP, "addr": BAR_ADDR}
        async with open_hypervisor(RunDir(self.h.rundir).hypervisor_socket) as hv:
            while not stop.is_set():
                seed = self.last_seed + 1
                try:
                    await hv.guest_driver(self.domid, self.device, "draw", {**params, "seed": seed})
                except HypercallError as exc:
                    if exc.errno_name != "EBUSY":
                        return  # the domain is gone
                    # Paused for the suspend: the frame was not drawn; the vCPU may resume.
                except HypervisorDisconnected:
                    return
                else:
                    self.last_seed, self.frames = seed, self.frames + 1
                await trio.sleep(FRAME_INTERVAL_S)


async def start_receiver(dst: Host) -> tuple[trio.Process, str]:
    """``xl-sim migrate-receive`` on the destination; the process and its ADDRESS:PORT."""
    argv = dst.xl("migrate-receive", "--listen", f"{dst.address}:0")
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(STEP_LIMIT_S):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            if not chunk:
                raise RuntimeError("migrate-receive exited before listening")
            line += chunk
    return proc, line.decode().split()[-1]


async def _finish(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    with trio.fail_after(STEP_LIMIT_S):
        while chunk := await proc.stdout.receive_some(65536):
            out += chunk
        err = await proc.stderr.receive_some(65536)
        await proc.wait()
    if proc.returncode:
        lines = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else "migrate-receive failed")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def run_case(case: Case, src: Host, dst: Host) -> MigrationCase:
    """Create on ``src``, draw throughout a live migration to ``dst``, check the screen."""
    r = MigrationCase(case.mode, case.device, case.toolstack, source_host=src.name)
    r.destination_host = dst.name
    r.network = "netns" if src.ns is not None else "loopback"
    r.namespaces = [h.ns.name for h in (src, dst) if h.ns is not None]
    try:
        await _migrate_case(case, src, dst, r)
    except (RuntimeError, OSError, trio.TooSlowError, ValueError, KeyError) as exc:
        r.error = str(exc) or type(exc).__name__
    r.ok = r.error is None and r.migrated and r.fb_sha256_guest == r.fb_sha256_expected
    r.ok = r.ok and r.fb_sha256_dm == r.fb_sha256_expected and r.derived_ptrs_valid is not False
    return r


async def _migrate_case(case: Case, src: Host, dst: Host, r: MigrationCase) -> None:
    with _span(r, "create"):
        made = await _run(
            src.xl("create", "--memory", str(GUEST_MEMORY_MIB), "--vga", case.device,
                   "--dm-mode", case.mode, "--toolstack", case.toolstack)
        )  # fmt: skip
    domid = r.source_domid = int(made["domid"])
    mode = ["--width", str(WIDTH), "--height", str(HEIGHT), "--bpp", str(BPP)]
    with _span(r, "map"):
        await _run(src.xl("guest", str(domid), "map-bar"))
        await _run(src.xl("guest", str(domid), "set-mode", *mode))
        await _run(src.xl("guest", str(domid), "draw", *mode, "--seed", str(case.seed)))
    drawer = Drawer(src, domid, case.device, case.seed)
    with _span(r, "migrate"):
        failure, sent, received = await _migrate_drawing(src, dst, domid, drawer)
    r.frames_drawn = drawer.frames
    if failure is not None:
        # The source domain ran on: it goes, so that the next case starts on a clean host.
        with _span(r, "destroy"), suppress(RuntimeError):
            await _run(src.xl("destroy", str(domid)))
        raise failure
    r.migrated = True
    r.fb_sha256_expected = pattern_sha256(case.device, drawer.last_seed)
    for k in ("precopy_rounds", "pages_sent", "pages_per_round", "downtime_s", "total_s"):
        setattr(r, k, sent[k])
    r.image_records = list(sent["records"])
    new = r.destination_domid = int(received["domid"])
    with _span(r, "verify"):
        r.fb_sha256_guest = (await _run(dst.xl("guest", str(new), "fb-hash", *mode)))["sha256"]
        r.fb_sha256_dm, r.derived_ptrs_valid = await _display(dst, new)
        r.physmap_keys = {src.name: dict(sent["xenstore_keys"]), dst.name: await _keys(dst, new)}
        r.physmap_xenstore_ops = {src.name: _ops(src, domid), dst.name: _ops(dst, new)}
    with _span(r, "destroy"):
        await _run(dst.xl("destroy", str(new)))


async def _migrate_drawing(
    src: Host, dst: Host, domid: int, drawer: Drawer
) -> tuple[RuntimeError | None, dict[str, Any], dict[str, Any]]:
    """``migrate-receive`` on ``dst``, ``migrate`` on ``src`` while ``drawer`` draws: the
    failure (if any), and what the sender and the receiver reported."""
    receiver, where = await start_receiver(dst)
    stop = trio.Event()
    failure: RuntimeError | None = None
    sent: dict[str, Any] = {}
    received: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drawer.run, stop)
            try:
                sent = await _run(src.xl("migrate", str(domid), where))
            except RuntimeError as exc:
                failure = exc
            finally:
                stop.set()
        try:
            received = await _finish(receiver)
        except RuntimeError as exc:
            failure = RuntimeError(f"{failure or 'migration failed'}; destination: {exc}")
    finally:
        if receiver.returncode is None:
            receiver.kill()
            with trio.CancelScope(shield=True):
                await receiver.wait()
    return failure, sent, received


async def _display(h: Host, domid: int) -> tuple[str | None, bool | None]:
    """What the device model shows (its display's hash) and whether its derived pointers are
    valid, from QMP ``x-physmap-info``."""
    with suppress(QmpError, QmpProtocolError, OSError), trio.fail_after(STEP_LIMIT_S):
        async with open_qmp(RunDir(h.rundir).qmp_socket(domid)) as q:
            info = await q.execute("x-physmap-info")
            shown = str(info["display_sha256"]) if info.get("display_sha256") else None
            valid = info.get("derived_ptrs_valid")
            return shown, valid if isinstance(valid, bool) else None
    return None, None


async def _keys(h: Host, domid: int) -> dict[str, str]:
    """The physmap keys under the destination device model's root in that host's xenstore."""
    root = f"/local/domain/0/device-model/{domid}/physmap"
    out: dict[str, str] = {}
    async with open_xenstore(RunDir(h.rundir).xenstored_socket) as xs:
        try:
            children = await xs.directory(root)
        except XsError:  # ENOENT: no keys
            return out
        for child in children:
            for name in ("start_addr", "size", "name"):
                with suppress(XsError):
                    value = await xs.read(f"{root}/{child}/{name}")
                    out[f"physmap/{child}/{name}"] = (
                        value.decode() if isinstance(value, bytes) else str(value)
                    )
    return out


def _ops(h: Host, domid: int) -> dict[str, int]:
    """Principal → xenstore requests on the domain's physmap paths, from the host's audit."""
    try:
        return dict(
            read_xenstored(RunDir(h.rundir).audit_log("xenstored")).physmap_ops(about=[domid])
        )
    except (OSError, AuditFormatError):
        return {}


async def run_migrations(
    cases: Sequence[Case], base: Path, *, use_netns: bool = True
) -> list[MigrationCase]:
    """Every case, each a migration from ``src`` to ``dst`` (two hosts kept for all)."""
    # Unique among concurrent runs, and short: the veth names built from it fit IFNAMSIZ.
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    results = []
    async with two_hosts(base, tag=tag, use_netns=use_netns) as (src, dst):
        for case in cases:
            results.append(await run_case(case, src, dst))
    return results

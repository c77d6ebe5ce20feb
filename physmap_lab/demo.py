"""``physmap-lab demo``: save and restore a guest's framebuffer in each device-model mode.

For every case (a mode, a VGA device and a toolstack flavour) the demo drives the stack the way
an administrator and a guest would (DESIGN.md, the ``physmap-lab demo`` contract):

1. ``xl-sim create``: the toolstack builds the domain and spawns its ``qemu-model``;
2. ``xl-sim guest``: the guest maps the VGA BAR at 0xf0000000 (above 0xbffff, so compat QEMU
   tracks it: qemu-physmap.md §1.2), sets a linear mode and draws a known pattern;
3. QMP ``x-physmap-info``: what the device model displays through its own pointers;
4. ``xl-sim save``: suspend, write the image, destroy the domain (as ``xl save`` does);
5. ``xl-sim restore``: a new domain and a new device model loading the saved device state;
6. QMP ``x-physmap-info`` and ``xl-sim guest fb-hash``: the framebuffer after restore, seen by
   the device model and read back by the guest; then ``xl-sim destroy``.

Each toolstack step is its own short-lived ``xl-sim`` process, as ``xl`` is, so the xenstore
audit log tells the toolstack, the device model and the guest apart.  The audit logs are read
afterwards to count who touched the physmap keys.

:func:`evaluate` and :func:`expected_to_work` are the pure part; :func:`run_demo` the trio shell.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from rich.markup import escape

from hypervisor_sim import guest_drivers
from toolstack.qmp import QmpError, QmpProtocolError, open_qmp

from .auditlog import AuditFormatError, read_xenstored
from .ready import accepts
from .stack import Stack, executable, open_stack

DEFAULT_MODES: Final = ("new", "compat")
DEFAULT_DEVICES: Final = ("stdvga", "cirrus", "qxl")
DEFAULT_TOOLSTACKS: Final = ("libxl",)

#: Where the guest puts the framebuffer: above 0xbffff, so compat mode records it
#: (qemu-physmap.md §1.2), at the address of libxl's example keys (§1.1).
BAR_ADDR: Final = guest_drivers.DEFAULT_BAR_ADDR
#: A mode every card can show: cirrus' 9-bit CRTC offset caps the pitch at 4088 bytes
#: (QEMU ``cirrus_get_offsets``), too little for 1024 pixels of 32 bits.
WIDTH: Final = 800
HEIGHT: Final = 600
BPP: Final = 32
#: Guest RAM: small, so that saving every page stays quick.
GUEST_MEMORY_MIB: Final = 32

#: A bound on one toolstack step or QMP query, so that a stuck process cannot hang the demo.
STEP_LIMIT_S: Final = 60.0
#: A bound on the clean-up after a case.
CLEANUP_LIMIT_S: Final = 30.0

XL_PROGRAM: Final = "xl-sim"
#: The QEMU release that merged the series; ``xl-sim --dm-qemu-version`` names others.
DEFAULT_QEMU: Final = "2.10"
DM_PROGRAM: Final = "qemu-model"


# -------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class Case:
    mode: str
    device: str
    toolstack: str = "libxl"
    #: Start the device model with ``dm_restrict`` (qemu-physmap.md §5.2).
    restrict: bool = False
    #: The QEMU the device model behaves as (``qemu-model --qemu-version``); 2.10 merged the
    #: series and is the default.
    qemu: str = DEFAULT_QEMU

    @property
    def name(self) -> str:
        suffix = "-restrict" if self.restrict else ""
        if self.qemu != DEFAULT_QEMU:
            suffix += f"-qemu{self.qemu}"
        return f"demo-{self.mode}-{self.device}-{self.toolstack}{suffix}"

    @property
    def label(self) -> str:
        suffix = "+restrict" if self.restrict else ""
        if self.qemu != DEFAULT_QEMU:
            suffix += f"@qemu-{self.qemu}"
        return f"{self.mode}/{self.device}/{self.toolstack}{suffix}"

    @property
    def seed(self) -> int:
        """A pattern of its own per case, so one case's pixels cannot pass for another's."""
        return zlib.crc32(self.label.encode()) & 0x7FFFFFFF


def plan(
    modes: Sequence[str] = DEFAULT_MODES,
    devices: Sequence[str] = DEFAULT_DEVICES,
    toolstacks: Sequence[str] = DEFAULT_TOOLSTACKS,
    qemus: Sequence[str] = (DEFAULT_QEMU,),
) -> list[Case]:
    """Every combination, in the order given, without repeats."""
    cases: list[Case] = []
    for qemu in dict.fromkeys(qemus):
        for mode in dict.fromkeys(modes):
            for device in dict.fromkeys(devices):
                for toolstack in dict.fromkeys(toolstacks):
                    cases.append(Case(mode, device, toolstack, qemu=qemu))
    return cases


def expected_to_work(case: Case) -> bool:
    """Whether save/restore should bring the framebuffer back in this case.

    New mode (and ``auto``, which picks it or compat) needs nothing from the toolstack.  Compat
    mode needs a toolstack that carries the physmap keys across (qemu-physmap.md §2).  The
    pointer-fixup scheme cannot reach QXL's derived pointers (§4.7).
    """
    if case.mode == "compat" and case.toolstack != "libxl":
        return False
    return not (case.mode == "pointer-fixup" and case.device == "qxl")


def pattern_sha256(device: str, seed: int) -> str:
    """The hash of the framebuffer the guest draws for ``seed`` (hypervisor_sim.guest_drivers)."""
    _gpa, length = guest_drivers.framebuffer(device, BAR_ADDR, WIDTH, HEIGHT, BPP)
    return hashlib.sha256(guest_drivers.pattern_bytes(seed, length)).hexdigest()


# ----------------------------------------------------------------------------- the results


@dataclass(slots=True)
class Observed:
    """What one case saw, step by step (``None`` where a step did not get that far)."""

    domid_saved: int | None = None
    domid_restored: int | None = None
    fb_sha256_guest_saved: str | None = None
    fb_sha256_dm_saved: str | None = None
    fb_sha256_dm_restored: str | None = None
    fb_sha256_guest_restored: str | None = None
    dm_mode: str | None = None
    dm_restricted: bool | None = None
    vram_ptr_saved: int | None = None
    vram_ptr_at_init: int | None = None
    vram_ptr_after_load: int | None = None
    derived_ptrs_valid: bool | None = None
    image_records: list[str] = field(default_factory=list)
    image_bytes: int | None = None
    xenstore_keys_saved: dict[str, str] = field(default_factory=dict)
    dm_physmap_ops: dict[str, int] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    #: Wall-clock (``time.time``) start and end of each step, to cut the audit logs by step.
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The step that raised, if one did.
    failed_step: str | None = None
    error: str | None = None


@dataclass(slots=True)
class CaseResult:
    """One object of ``{"runs": [...]}``."""

    mode: str
    device: str
    toolstack: str
    dm: str | None
    #: The QEMU the device model behaved as.
    qemu_version: str
    ok: bool
    expected_ok: bool
    error: str | None
    fb_sha256_expected: str
    fb_sha256_saved: str | None
    fb_sha256_restored: str | None
    fb_sha256_dm_saved: str | None
    fb_sha256_guest_restored: str | None
    vram_ptr_at_init: int | None
    vram_ptr_after_load: int | None
    vram_ptr_saved: int | None
    derived_ptrs_valid: bool | None
    image_records: list[str]
    image_bytes: int | None
    xenstore_keys_saved: dict[str, str]
    physmap_xenstore_ops: dict[str, int] | None
    physmap_xenstore_ops_ok: dict[str, int] | None
    dm_physmap_ops: dict[str, int]
    domids: list[int]
    seconds: float
    steps: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    case: Case,
    seen: Observed,
    physmap_ops: tuple[dict[str, int], dict[str, int]] | None,
    seconds: float,
) -> CaseResult:
    """Judge a case: it is ok when every view of the framebuffer shows the pattern the guest
    drew (the guest before save and after restore, the device model before save and after
    restore) and QXL's derived pointers still point into the VRAM."""
    expected = pattern_sha256(case.device, case.seed)
    error = seen.error
    if error is None:
        views = {
            "the guest before save": seen.fb_sha256_guest_saved,
            "the device model before save": seen.fb_sha256_dm_saved,
            "the device model after restore": seen.fb_sha256_dm_restored,
            "the guest after restore": seen.fb_sha256_guest_restored,
        }
        wrong = [f"{who} sees {_short(h)}" for who, h in views.items() if h != expected]
        if wrong:
            error = f"framebuffer is not the pattern drawn ({_short(expected)}): " + "; ".join(
                wrong
            )
        elif seen.derived_ptrs_valid is False:
            error = "the device's derived pointers no longer point into the VRAM"
    dm = seen.dm_mode
    if dm is not None and seen.dm_restricted:
        dm += "+restrict"
    return CaseResult(
        mode=case.mode,
        device=case.device,
        toolstack=case.toolstack,
        dm=dm,
        qemu_version=case.qemu,
        ok=error is None,
        expected_ok=expected_to_work(case),
        error=error,
        fb_sha256_expected=expected,
        fb_sha256_saved=seen.fb_sha256_guest_saved,
        fb_sha256_restored=seen.fb_sha256_dm_restored,
        fb_sha256_dm_saved=seen.fb_sha256_dm_saved,
        fb_sha256_guest_restored=seen.fb_sha256_guest_restored,
        vram_ptr_at_init=seen.vram_ptr_at_init,
        vram_ptr_after_load=seen.vram_ptr_after_load,
        vram_ptr_saved=seen.vram_ptr_saved,
        derived_ptrs_valid=seen.derived_ptrs_valid,
        image_records=list(seen.image_records),
        image_bytes=seen.image_bytes,
        xenstore_keys_saved=dict(seen.xenstore_keys_saved),
        physmap_xenstore_ops=None if physmap_ops is None else physmap_ops[0],
        physmap_xenstore_ops_ok=None if physmap_ops is None else physmap_ops[1],
        dm_physmap_ops=dict(seen.dm_physmap_ops),
        domids=[d for d in (seen.domid_saved, seen.domid_restored) if d is not None],
        seconds=round(seconds, 3),
        steps={k: round(v, 3) for k, v in seen.steps.items()},
    )


def _short(digest: str | None) -> str:
    return "no picture" if digest is None else digest[:12]


def failed_unexpectedly(results: Iterable[CaseResult]) -> list[CaseResult]:
    """The cases that should have worked and did not: these make the demo exit non-zero."""
    return [r for r in results if r.expected_ok and not r.ok]


def worked_unexpectedly(results: Iterable[CaseResult]) -> list[CaseResult]:
    """The cases the facts say must break and that restored intact: the model is wrong, and
    these make the demo exit non-zero too."""
    return [r for r in results if r.ok and not r.expected_ok]


# ----------------------------------------------------------------------- what is left behind


def leftover_files(rundir: Path, domids: Iterable[int] | None = None) -> list[Path]:
    """Sockets and guest-memory files still in ``rundir``: of ``domids`` only, or all."""
    if domids is None:
        patterns = ["socket", "hypervisor.sock", "principals/*/*", "domains/*.sock"]
        patterns += ["qmp/*.sock", "mem/*.mem"]
    else:
        patterns = []
        for d in domids:
            patterns += [f"domains/{d}.sock", f"qmp/{d}.sock", f"mem/dom{d}.mem"]
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(rundir.glob(pattern))
    return found


def device_models(rundir: Path, domids: Iterable[int] | None = None) -> list[int]:
    """Pids of ``qemu-model`` processes serving ``rundir`` (for ``domids`` only, if given)."""
    wanted = None if domids is None else {str(d) for d in domids}
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [
                a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        if not any(Path(a).name == DM_PROGRAM for a in args[:2]):
            continue
        if _arg(args, "--rundir") != str(rundir):
            continue
        if wanted is not None and _arg(args, "--domid") not in wanted:
            continue
        found.append(int(entry.name))
    return found


def _arg(args: Sequence[str], option: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == option:
            return args[i + 1]
    return None


async def _end_processes(pids: Sequence[int]) -> None:
    """SIGTERM, a short wait, then SIGKILL: for device models a failed destroy left running."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(5):
        while any(_alive(p) for p in pids):
            await trio.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


# ------------------------------------------------------------------------------- the shell


class StepError(Exception):
    """A toolstack step or a QMP query failed; the message says which and why."""


Reporter = Callable[[str], None]


@dataclass
class DemoRun:
    """A demo against a stack on ``rundir``: the toolstack's environment and the images."""

    rundir: Path
    report: Reporter
    keep: bool = False
    #: Where QMP ``screendump`` puts a PNG of the guest's screen before save and after
    #: restore (:func:`screenshot_path`); None: no screenshots.
    screenshots: Path | None = None
    #: Which screenshots to take, by case and :data:`BEFORE_SAVE` / :data:`AFTER_RESTORE`
    #: (all when None).
    shoot: Callable[[Case, str], bool] | None = None

    def __post_init__(self) -> None:
        self.env = Stack.attach(self.rundir).env()
        self.images = self.rundir / "images"

    async def xl(self, *args: str) -> dict[str, Any]:
        """Run one ``xl-sim --json`` command and return what it printed."""
        try:
            program = executable(XL_PROGRAM)
        except FileNotFoundError as exc:
            raise StepError(str(exc)) from None
        argv = [program, "--rundir", str(self.rundir), "--json", *args]
        with trio.fail_after(STEP_LIMIT_S):
            proc = await trio.run_process(
                argv,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=self.env,
            )
        out: Any = None
        with suppress(ValueError, IndexError):
            out = json.loads(proc.stdout.decode(errors="replace").strip().splitlines()[-1])
        if proc.returncode != 0 or not isinstance(out, dict) or "error" in out:
            if isinstance(out, dict) and out.get("error"):
                why = str(out["error"])
            else:
                why = _tail(proc.stderr) or f"exit status {proc.returncode}"
            raise StepError(f"xl-sim {' '.join(args)}: {why}")
        return out

    async def physmap_info(self, domid: int) -> dict[str, Any]:
        """The device model's ``x-physmap-info`` over its QMP socket."""
        path = self.rundir / "qmp" / f"{domid}.sock"
        try:
            with trio.fail_after(STEP_LIMIT_S):
                async with open_qmp(path) as qmp:
                    info = await qmp.execute("x-physmap-info")
        except (QmpError, QmpProtocolError) as exc:
            raise StepError(f"x-physmap-info of domain {domid}: {exc}") from None
        if not isinstance(info, dict):
            raise StepError(f"x-physmap-info of domain {domid} returned {info!r}")
        return info

    async def screendump(self, case: Case, domid: int, when: str) -> dict[str, Any]:
        """QMP ``screendump`` of the device model's screen, if this case gets screenshots."""
        if self.screenshots is None or (self.shoot is not None and not self.shoot(case, when)):
            return {}
        path = screenshot_path(self.screenshots.resolve(), case, when)
        path.parent.mkdir(parents=True, exist_ok=True)
        qmp_path = self.rundir / "qmp" / f"{domid}.sock"
        try:
            with trio.fail_after(STEP_LIMIT_S):
                async with open_qmp(qmp_path) as qmp:
                    await qmp.execute("screendump", {"filename": str(path), "format": "png"})
        except (QmpError, QmpProtocolError, OSError) as exc:
            raise StepError(f"screendump of domain {domid}: {exc}") from None
        return {"file": str(path)}

    async def run_case(self, case: Case) -> Observed:
        """Drive one case; every domain it made is destroyed before it returns."""
        seen = Observed()
        live: set[int] = set()
        mode_args = ["--width", str(WIDTH), "--height", str(HEIGHT), "--bpp", str(BPP)]
        mode_args += ["--addr", hex(BAR_ADDR)]
        self.images.mkdir(parents=True, exist_ok=True)
        image = self.images / f"{case.name}.img"

        async def step(name: str, action: Awaitable[dict[str, Any]]) -> dict[str, Any]:
            t0, w0 = time.monotonic(), time.time()
            try:
                result = await action
            except BaseException:
                seen.failed_step = name
                raise
            finally:
                seen.spans[name] = (w0, time.time())
            seen.steps[name] = time.monotonic() - t0
            return result

        try:
            created = await step(
                "create",
                self.xl(
                    "create",
                    "--name",
                    case.name,
                    "--memory",
                    str(GUEST_MEMORY_MIB),
                    "--vga",
                    case.device,
                    "--dm-mode",
                    case.mode,
                    "--toolstack",
                    case.toolstack,
                    "--dm-qemu-version",
                    case.qemu,
                    *(["--dm-restrict"] if case.restrict else []),
                ),
            )
            domid = _field(created, "domid", "xl-sim create")
            seen.domid_saved = domid
            live.add(domid)
            self.report(
                f"{case.label}: created domain {domid}, device model pid {created.get('dm_pid')}"
            )

            # QXL keeps its RAM header at the end of BAR 0 (qemu_model/qxl.py): the guest's
            # driver needs the VRAM size, which a real one learns by sizing the BAR.
            created_info = await step("info-created", self.physmap_info(domid))
            vram_mib = _field(created_info, "vram_size", "x-physmap-info") >> 20
            g = ["guest", str(domid)]
            await step("map-bar", self.xl(*g, "map-bar", "--addr", hex(BAR_ADDR)))
            await step("set-mode", self.xl(*g, "set-mode", *mode_args, "--vram-mib", str(vram_mib)))
            await step("draw", self.xl(*g, "draw", *mode_args, "--seed", str(case.seed)))
            seen.fb_sha256_guest_saved = (
                await step("fb-hash", self.xl(*g, "fb-hash", *mode_args))
            ).get("sha256")
            before = await step("info-saved", self.physmap_info(domid))
            seen.fb_sha256_dm_saved = before.get("display_sha256")
            seen.vram_ptr_saved = before.get("vram_ptr")
            seen.dm_physmap_ops["saved"] = int(before.get("xenstore_physmap_ops") or 0)
            await step("screendump-saved", self.screendump(case, domid, BEFORE_SAVE))
            self.report(
                f"{case.label}: guest drew pattern {case.seed:#x} at {BAR_ADDR:#x}; "
                f"guest reads {_short(seen.fb_sha256_guest_saved)}, "
                f"device model shows {_short(seen.fb_sha256_dm_saved)}"
            )

            saved = await step("save", self.xl("save", str(domid), str(image)))
            # xl save destroys the domain once the image is complete.
            live.discard(domid)
            seen.image_records = [str(r) for r in saved.get("records", [])]
            seen.image_bytes = saved.get("bytes")
            seen.xenstore_keys_saved = dict(saved.get("xenstore_keys") or {})
            self.report(
                f"{case.label}: saved and destroyed domain {domid}: {' '.join(seen.image_records)}"
            )

            restored = await step("restore", self.xl("restore", str(image)))
            new = _field(restored, "domid", "xl-sim restore")
            seen.domid_restored = new
            live.add(new)
            after = await step("info-restored", self.physmap_info(new))
            seen.fb_sha256_dm_restored = after.get("display_sha256")
            seen.dm_mode = after.get("mode")
            seen.dm_restricted = after.get("restricted")
            seen.vram_ptr_at_init = after.get("vram_ptr_at_init")
            seen.vram_ptr_after_load = after.get("vram_ptr")
            seen.derived_ptrs_valid = after.get("derived_ptrs_valid")
            seen.dm_physmap_ops["restored"] = int(after.get("xenstore_physmap_ops") or 0)
            await step("screendump-restored", self.screendump(case, new, AFTER_RESTORE))
            g = ["guest", str(new)]
            seen.fb_sha256_guest_restored = (
                await step("fb-hash-restored", self.xl(*g, "fb-hash", *mode_args))
            ).get("sha256")
            self.report(
                f"{case.label}: restored as domain {new}; device model shows "
                f"{_short(seen.fb_sha256_dm_restored)}, guest reads "
                f"{_short(seen.fb_sha256_guest_restored)}"
            )
            await step("destroy", self.xl("destroy", str(new)))
            live.discard(new)
        except StepError as exc:
            seen.error = str(exc)
            first = str(exc).splitlines()[0]
            self.report(f"{case.label}: [red]failed: {escape(first)}[/red]")
        except trio.TooSlowError:
            seen.error = f"a step took longer than {STEP_LIMIT_S:.0f} s"
            self.report(f"{case.label}: [red]failed: {seen.error}[/red]")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_LIMIT_S):
                await self._clean_up(case, live, seen)
                if not self.keep:
                    image.unlink(missing_ok=True)
                    Path(f"{image}.tmp").unlink(missing_ok=True)
        return seen

    async def _clean_up(self, case: Case, live: set[int], seen: Observed) -> None:
        for domid in sorted(live):
            with suppress(StepError, trio.TooSlowError):
                await self.xl("destroy", str(domid))
        domids = [d for d in (seen.domid_saved, seen.domid_restored) if d is not None]
        stray = device_models(self.rundir, domids)
        if stray:
            await _end_processes(stray)
            seen.error = seen.error or f"device models left running: pids {stray}"
        files = leftover_files(self.rundir, domids)
        if files:
            seen.error = seen.error or "left behind: " + ", ".join(str(f) for f in files)
        if domids and (stray or files):
            what = ", ".join([f"pid {p}" for p in stray] + [str(f) for f in files])
            self.report(f"{case.label}: [red]cleaned up after the toolstack: {escape(what)}[/red]")


BEFORE_SAVE: Final = "before-save"
AFTER_RESTORE: Final = "after-restore"


def screenshot_path(directory: Path, case: Case, when: str) -> Path:
    """``DIR/demo-MODE-DEVICE-TOOLSTACK[-restrict]-{before-save,after-restore}.png``."""
    return directory / f"{case.name}-{when}.png"


def _field(reply: Mapping[str, Any], name: str, source: str) -> int:
    value = reply.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StepError(f"{source} gave no {name}: {dict(reply)!r}")
    return value


def _tail(data: bytes, lines: int = 3) -> str:
    text = data.decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


@dataclass
class DemoOutcome:
    results: list[CaseResult]
    rundir: Path
    seconds: float
    #: Problems with the run as a whole: files or processes left behind, an unreadable log.
    problems: list[str]

    @property
    def exit_status(self) -> int:
        wrong = failed_unexpectedly(self.results) or worked_unexpectedly(self.results)
        return 1 if wrong or self.problems else 0


def _check_attach(rundir: Path) -> None:
    """``--attach`` uses daemons already running on ``rundir`` (the compose toolstack service)."""
    stack = Stack.attach(rundir)
    for name, sock in (
        ("xenstored-sim", stack.xenstored_socket),
        ("hypervisor-sim", stack.hypervisor_socket),
    ):
        if not accepts(str(sock)):
            raise StepError(f"--attach: no {name} accepts connections on {sock}")
    # The toolstack keeps its own audit record only if the directory exists (toolstack.audit).
    (rundir / "audit").mkdir(exist_ok=True)


async def run_demo(
    cases: Sequence[Case],
    *,
    rundir: str | os.PathLike[str] | None = None,
    attach: bool = False,
    keep: bool = False,
    screenshots: str | os.PathLike[str] | None = None,
    report: Reporter = lambda _msg: None,
) -> DemoOutcome:
    """Run ``cases`` one after another on a stack of its own (or, with ``attach``, on the
    daemons already running on ``rundir``) and read the audit log once they are done.

    Without ``rundir`` the stack runs in a temporary directory, removed afterwards unless
    ``keep``.  With ``screenshots``, each case leaves two PNGs there (:func:`screenshot_path`).  Raises :class:`StepError` if the stack cannot be started or attached to.
    """
    t0 = time.monotonic()
    temporary = rundir is None
    root = Path(tempfile.mkdtemp(prefix="physmap-lab-") if rundir is None else rundir).resolve()
    problems: list[str] = []
    observed: list[tuple[Case, Observed]] = []
    try:
        async with AsyncExitStack() as daemons:
            if attach:
                _check_attach(root)
            else:
                if accepts(str(root / "socket")):
                    raise StepError(f"{root} already has a running xenstored (use --attach)")
                try:
                    stack = await daemons.enter_async_context(open_stack(root, audit=True))
                except (RuntimeError, OSError) as exc:
                    raise StepError(f"cannot start the stack: {exc}") from None
                pids = ", ".join(f"{d.name} pid {d.pid}" for d in stack.daemons.values())
                report(f"stack on {root}: {pids}")
            shots = None if screenshots is None else Path(screenshots)
            run = DemoRun(root, report, keep, shots)
            for case in cases:
                report(f"{case.label}: [bold]start[/bold]")
                c0 = time.monotonic()
                seen = await run.run_case(case)
                seen.steps["total"] = time.monotonic() - c0
                observed.append((case, seen))
        if not attach:
            # The daemons have stopped: their sockets and memory files must be gone too.
            problems += [f"left behind: {f}" for f in leftover_files(root)]
            stray = device_models(root)
            if stray:
                await _end_processes(stray)
                problems.append(f"device models left running: pids {stray}")
        results = _judge(root, observed, problems)
    finally:
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return DemoOutcome(results, root, time.monotonic() - t0, problems)


def _judge(
    root: Path, observed: Sequence[tuple[Case, Observed]], problems: list[str]
) -> list[CaseResult]:
    """Evaluate each case, counting its physmap requests in the xenstore audit log."""
    audit = root / "audit" / "xenstored.jsonl"
    log = None
    if audit.exists():
        try:
            log = read_xenstored(audit)
        except AuditFormatError as exc:
            problems.append(f"cannot read the xenstore audit log: {exc}")
    else:
        problems.append(f"no xenstore audit log at {audit}")
    results = []
    for case, seen in observed:
        domids = [d for d in (seen.domid_saved, seen.domid_restored) if d is not None]
        ops = None
        if log is not None:
            ops = (log.physmap_ops(about=domids), log.physmap_ops(about=domids, ok=True))
        results.append(evaluate(case, seen, ops, seen.steps.get("total", 0.0)))
    return results

"""Running one demo case: each toolstack step its own ``xl-sim`` process, each QMP query on the
device model's socket, every step timed, and every domain destroyed again."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from rich.markup import escape

import xenhost
from toolstack.qmp import QmpError, QmpProtocolError, open_qmp
from xenhost import RunDir

from ..stack import Stack, executable
from .leftovers import device_models, end_processes, leftover_files
from .plan import BAR_ADDR, BPP, GUEST_MEMORY_MIB, HEIGHT, WIDTH, Case
from .verdict import Observed, short_digest

#: A bound on one toolstack step or QMP query, so that a stuck process cannot hang the demo.
STEP_LIMIT_S: Final = 60.0
#: A bound on the clean-up after a case.
CLEANUP_LIMIT_S: Final = 30.0

XL_PROGRAM: Final = "xl-sim"


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
        argv = xenhost.xl_json_argv(self.rundir, *args, program=program)
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
        path = RunDir(self.rundir).qmp_socket(domid)
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
        qmp_path = RunDir(self.rundir).qmp_socket(domid)
        try:
            with trio.fail_after(STEP_LIMIT_S):
                async with open_qmp(qmp_path) as qmp:
                    await qmp.execute("screendump", {"filename": str(path), "format": "png"})
        except (QmpError, QmpProtocolError, OSError) as exc:
            raise StepError(f"screendump of domain {domid}: {exc}") from None
        return {"file": str(path)}

    async def run_case(self, case: Case) -> Observed:
        """Drive one case; every domain it made is destroyed before it returns."""
        self.images.mkdir(parents=True, exist_ok=True)
        steps = CaseSteps(self, case, self.images / f"{case.name}.img")
        seen = steps.seen
        try:
            await steps.drive()
        except StepError as exc:
            seen.error = str(exc)
            first = str(exc).splitlines()[0]
            self.report(f"{case.label}: [red]failed: {escape(first)}[/red]")
        except trio.TooSlowError:
            seen.error = f"a step took longer than {STEP_LIMIT_S:.0f} s"
            self.report(f"{case.label}: [red]failed: {seen.error}[/red]")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_LIMIT_S):
                await self._clean_up(case, steps.live, seen)
                if not self.keep:
                    steps.image.unlink(missing_ok=True)
                    Path(f"{steps.image}.tmp").unlink(missing_ok=True)
        return seen

    async def _clean_up(self, case: Case, live: set[int], seen: Observed) -> None:
        for domid in sorted(live):
            with suppress(StepError, trio.TooSlowError):
                await self.xl("destroy", str(domid))
        domids = [d for d in (seen.domid_saved, seen.domid_restored) if d is not None]
        stray = device_models(self.rundir, domids)
        if stray:
            await end_processes(stray)
            seen.error = seen.error or f"device models left running: pids {stray}"
        files = leftover_files(self.rundir, domids)
        if files:
            seen.error = seen.error or "left behind: " + ", ".join(str(f) for f in files)
        if domids and (stray or files):
            what = ", ".join([f"pid {p}" for p in stray] + [str(f) for f in files])
            self.report(f"{case.label}: [red]cleaned up after the toolstack: {escape(what)}[/red]")


class CaseSteps:
    """The steps of one case, in order: create, draw, save, restore, destroy.  Each is timed
    into :attr:`seen`; :attr:`live` holds the domains that exist now."""

    def __init__(self, run: DemoRun, case: Case, image: Path) -> None:
        self.run, self.case, self.image = run, case, image
        self.seen = Observed()
        self.live: set[int] = set()
        self.mode_args = ["--width", str(WIDTH), "--height", str(HEIGHT), "--bpp", str(BPP)]
        self.mode_args += ["--addr", hex(BAR_ADDR)]

    async def step(self, name: str, action: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Await one step, recording how long it took and, if it raised, that it failed."""
        seen = self.seen
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

    async def drive(self) -> None:
        domid = await self.create()
        await self.draw(domid)
        await self.save(domid)
        new = await self.restore()
        await self.step("destroy", self.run.xl("destroy", str(new)))
        self.live.discard(new)

    async def create(self) -> int:
        """``xl-sim create``: the domain and its device model."""
        case, seen = self.case, self.seen
        restrict = ["--dm-restrict"] if case.restrict else []
        created = await self.step(
            "create",
            self.run.xl(
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
                *restrict,
            ),
        )
        domid = _field(created, "domid", "xl-sim create")
        seen.domid_saved = domid
        self.live.add(domid)
        self.run.report(
            f"{case.label}: created domain {domid}, device model pid {created.get('dm_pid')}"
        )
        return domid

    async def draw(self, domid: int) -> None:
        """The guest maps the BAR, sets the mode and draws; both sides read the picture back."""
        case, seen, run, mode_args = self.case, self.seen, self.run, self.mode_args
        # QXL keeps its RAM header at the end of BAR 0 (qemu_model/qxl.py): the guest's
        # driver needs the VRAM size, which a real one learns by sizing the BAR.
        created_info = await self.step("info-created", run.physmap_info(domid))
        vram_mib = _field(created_info, "vram_size", "x-physmap-info") >> 20
        g = ["guest", str(domid)]
        await self.step("map-bar", run.xl(*g, "map-bar", "--addr", hex(BAR_ADDR)))
        await self.step("set-mode", run.xl(*g, "set-mode", *mode_args, "--vram-mib", str(vram_mib)))
        await self.step("draw", run.xl(*g, "draw", *mode_args, "--seed", str(case.seed)))
        seen.fb_sha256_guest_saved = (
            await self.step("fb-hash", run.xl(*g, "fb-hash", *mode_args))
        ).get("sha256")
        before = await self.step("info-saved", run.physmap_info(domid))
        seen.fb_sha256_dm_saved = before.get("display_sha256")
        seen.vram_ptr_saved = before.get("vram_ptr")
        seen.dm_physmap_ops["saved"] = int(before.get("xenstore_physmap_ops") or 0)
        await self.step("screendump-saved", run.screendump(case, domid, BEFORE_SAVE))
        run.report(
            f"{case.label}: guest drew pattern {case.seed:#x} at {BAR_ADDR:#x}; "
            f"guest reads {short_digest(seen.fb_sha256_guest_saved)}, "
            f"device model shows {short_digest(seen.fb_sha256_dm_saved)}"
        )

    async def save(self, domid: int) -> None:
        """``xl-sim save``: the image written and the domain destroyed."""
        seen = self.seen
        saved = await self.step("save", self.run.xl("save", str(domid), str(self.image)))
        # xl save destroys the domain once the image is complete.
        self.live.discard(domid)
        seen.image_records = [str(r) for r in saved.get("records", [])]
        seen.image_bytes = saved.get("bytes")
        seen.xenstore_keys_saved = dict(saved.get("xenstore_keys") or {})
        self.run.report(
            f"{self.case.label}: saved and destroyed domain {domid}: {' '.join(seen.image_records)}"
        )

    async def restore(self) -> int:
        """``xl-sim restore``: a new domain; both sides read the picture back again."""
        case, seen, run = self.case, self.seen, self.run
        restored = await self.step("restore", run.xl("restore", str(self.image)))
        new = _field(restored, "domid", "xl-sim restore")
        seen.domid_restored = new
        self.live.add(new)
        after = await self.step("info-restored", run.physmap_info(new))
        seen.fb_sha256_dm_restored = after.get("display_sha256")
        seen.dm_mode = after.get("mode")
        seen.dm_restricted = after.get("restricted")
        seen.vram_ptr_at_init = after.get("vram_ptr_at_init")
        seen.vram_ptr_after_load = after.get("vram_ptr")
        seen.derived_ptrs_valid = after.get("derived_ptrs_valid")
        seen.dm_physmap_ops["restored"] = int(after.get("xenstore_physmap_ops") or 0)
        await self.step("screendump-restored", run.screendump(case, new, AFTER_RESTORE))
        g = ["guest", str(new)]
        seen.fb_sha256_guest_restored = (
            await self.step("fb-hash-restored", run.xl(*g, "fb-hash", *self.mode_args))
        ).get("sha256")
        run.report(
            f"{case.label}: restored as domain {new}; device model shows "
            f"{short_digest(seen.fb_sha256_dm_restored)}, guest reads "
            f"{short_digest(seen.fb_sha256_guest_restored)}"
        )
        return new


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

"""The trio shell of ``physmap-lab audit``: run the matrix on one stack through the demo's
case runner, then cut the audit logs by case and phase."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xenhost import RunDir
from xenhost.devices import DEVICE_NAMES

from ..auditlog import Principal, read_hypervisor, read_toolstack, read_xenstored
from ..demo import (
    AFTER_RESTORE,
    Case,
    DemoRun,
    Observed,
    Reporter,
    StepError,
    device_models,
    end_processes,
    evaluate,
    leftover_files,
)
from ..ready import accepts
from ..stack import open_stack
from .enforce import EnforcedCell, Variant, judge
from .findings import least_privilege
from .privilege import Permission
from .report import SCREEN_CELLS
from .scenario import Scenario, build, median

TOOLSTACKS: Final = ("libxl", "unaware")
MODES: Final = ("compat", "new", "pointer-fixup")
DEVICES: Final = DEVICE_NAMES
DMS: Final = ("privileged", "restricted")
#: The QEMU versions whose restriction differs: 2.10 (xen_restrict of the devicemodel and
#: foreignmemory handles) and 3.0 (xentoolcore_restrict_all, xenstore closed).
QEMUS: Final = ("2.10", "3.0")


def matrix(
    toolstacks: Sequence[str] = TOOLSTACKS,
    modes: Sequence[str] = MODES,
    devices: Sequence[str] = DEVICES,
    dms: Sequence[str] = DMS,
    qemus: Sequence[str] = QEMUS,
) -> list[Case]:
    """Every cell, toolstack outermost, without repeats.  A privileged device model behaves
    the same in every QEMU version, so it runs as the first only.  A restricted one runs as
    each, the later versions with the first device only: restriction does not depend on the
    device, and the matrix stays bounded."""
    versions = list(dict.fromkeys(qemus))
    first_device = next(iter(dict.fromkeys(devices)), None)

    def qemus_for(device: str, dm: str) -> list[str]:
        if dm != "restricted":
            return versions[:1]
        return versions if device == first_device else versions[:1]

    return [
        Case(mode, device, toolstack, restrict=dm == "restricted", qemu=qemu)
        for toolstack in dict.fromkeys(toolstacks)
        for mode in dict.fromkeys(modes)
        for device in dict.fromkeys(devices)
        for dm in dict.fromkeys(dms)
        for qemu in qemus_for(device, dm)
    ]


@dataclass
class AuditOutcome:
    scenarios: list[Scenario]
    #: Per cell label, the save and restore seconds of every repeat.
    timings: dict[str, dict[str, list[float]]]
    problems: list[str]
    seconds: float


def shows_screen(case: Case, when: str) -> bool:
    """Only the restored screens the report shows are taken."""
    return (
        when == AFTER_RESTORE
        and (case.mode, case.device) in SCREEN_CELLS
        and case.toolstack == "libxl"
        and not case.restrict
    )


async def _run_once(
    cases: Sequence[Case],
    root: Path,
    report: Reporter,
    progress: Reporter,
    screenshots: Path | None = None,
) -> tuple[list[Scenario], list[str]]:
    problems: list[str] = []
    observed: list[tuple[Case, Observed, float, float]] = []
    async with AsyncExitStack() as daemons:
        if accepts(str(RunDir(root).xenstored_socket)):
            raise StepError(f"{root} already has a running xenstored")
        try:
            await daemons.enter_async_context(open_stack(root, audit=True))
        except (RuntimeError, OSError) as exc:
            raise StepError(f"cannot start the stack: {exc}") from None
        run = DemoRun(root, report, screenshots=screenshots, shoot=shows_screen)
        for i, case in enumerate(cases, 1):
            progress(f"[{i}/{len(cases)}] {case.label}")
            w0, c0 = time.time(), time.monotonic()
            seen = await run.run_case(case)
            seen.steps["total"] = time.monotonic() - c0
            observed.append((case, seen, w0, time.time()))
    problems += [f"left behind: {f}" for f in leftover_files(root)]
    stray = device_models(root)
    if stray:
        await end_processes(stray)
        problems.append(f"device models left running: pids {stray}")
    xs = read_xenstored(RunDir(root).audit_log("xenstored"))
    hv = read_hypervisor(RunDir(root).audit_log("hypervisor"))
    ts = read_toolstack(RunDir(root).audit_log("toolstack"))
    scenarios = []
    for case, seen, w0, w1 in observed:
        result = evaluate(case, seen, None, seen.steps["total"])
        mine = [r for r in xs if w0 <= r.t < w1]
        calls = [h for h in hv if w0 <= h.t < w1]
        actions = [a for a in ts if w0 <= a.t < w1]
        scenarios.append(build(case, seen, result, mine, calls, actions))
    return scenarios, problems


async def run_audit(
    cases: Sequence[Case],
    *,
    repeats: int = 1,
    out_rundir: str | os.PathLike[str] | None = None,
    screenshots: Path | None = None,
    report: Reporter = lambda _m: None,
    progress: Reporter = lambda _m: None,
) -> AuditOutcome:
    """Run ``cases`` ``repeats`` times, each repeat on a fresh stack; the scenarios are those of
    the first repeat, with save and restore times replaced by their medians over the repeats.
    With ``screenshots``, the first repeat leaves the screens of :data:`SCREEN_CELLS` there."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    t0 = time.monotonic()
    problems: list[str] = []
    first: list[Scenario] = []
    timings: dict[str, dict[str, list[float]]] = {}
    for n in range(repeats):
        if out_rundir is not None:
            root = Path(out_rundir).resolve() / f"run{n}"
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="physmap-audit-")).resolve()
        try:
            shots = screenshots if n == 0 else None
            scenarios, more = await _run_once(cases, root, report, progress, shots)
        finally:
            if out_rundir is None:
                shutil.rmtree(root, ignore_errors=True)
        problems += more
        for s in scenarios:
            t = timings.setdefault(s.label, {"save": [], "restore": []})
            if s.save_s is not None:
                t["save"].append(s.save_s)
            if s.restore_s is not None:
                t["restore"].append(s.restore_s)
        if n == 0:
            first = scenarios
    for s in first:
        s.save_s = median(timings[s.label]["save"])
        s.restore_s = median(timings[s.label]["restore"])
    return AuditOutcome(first, timings, problems, time.monotonic() - t0)


class _EnforcedRun(DemoRun):
    """The demo's case runner with a variant's stub-domain options added to ``xl-sim create``
    and ``xl-sim restore``."""

    variant: Variant | None = None

    async def xl(self, *args: str) -> dict[str, Any]:
        extra = self.variant.xl_args(args[0]) if self.variant is not None and args else []
        return await super().xl(*args, *extra)


def derived_sets(scenarios: Sequence[Scenario]) -> dict[str, list[Permission]]:
    """The device model's derived set per mode, for the modes with an intact libxl cell with a
    privileged device model (:func:`.findings.least_privilege`)."""
    have = {
        s.mode
        for s in scenarios
        if s.toolstack == "libxl" and s.dm == "privileged" and s.outcome == "intact"
    }
    return {
        mode: per[Principal.DEVICE_MODEL.value]
        for mode, per in least_privilege(scenarios).items()
        if mode in have
    }


async def run_enforced(
    variants: Sequence[Variant],
    *,
    report: Reporter = lambda _m: None,
    progress: Reporter = lambda _m: None,
) -> tuple[list[EnforcedCell], list[str]]:
    """Run each variant on a fresh stack of its own run directory; returns the judged cells and
    problems with the run as a whole (files or device models left behind)."""
    root = Path(tempfile.mkdtemp(prefix="physmap-enforce-")).resolve()
    problems: list[str] = []
    observed: list[tuple[Variant, Observed, float, float]] = []
    try:
        async with AsyncExitStack() as daemons:
            try:
                await daemons.enter_async_context(open_stack(root, audit=True))
            except (RuntimeError, OSError) as exc:
                raise StepError(f"cannot start the stack: {exc}") from None
            run = _EnforcedRun(root, report)
            for i, variant in enumerate(variants, 1):
                progress(f"[{i}/{len(variants)}] enforced {variant.label}")
                run.variant = variant
                w0, c0 = time.time(), time.monotonic()
                seen = await run.run_case(variant.case)
                seen.steps["total"] = time.monotonic() - c0
                observed.append((variant, seen, w0, time.time()))
        problems += [f"left behind: {f}" for f in leftover_files(root)]
        stray = device_models(root)
        if stray:
            await end_processes(stray)
            problems.append(f"device models left running: pids {stray}")
        xs = read_xenstored(RunDir(root).audit_log("xenstored"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cells = []
    for variant, seen, w0, w1 in observed:
        result = evaluate(variant.case, seen, None, seen.steps["total"])
        cells.append(judge(variant, seen, result, [r for r in xs if w0 <= r.t < w1]))
    return cells, problems

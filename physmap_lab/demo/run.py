"""``physmap-lab demo`` as a whole: a stack of its own (or attached to running daemons), every
case one after another, then the audit log read and every case judged."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from xenhost import RunDir

from ..ready import accepts
from ..stack import Stack, open_stack
from .case import DemoRun, Reporter, StepError
from .leftovers import device_models, end_processes, leftover_files
from .plan import Case
from .verdict import CaseResult, Observed, failed_unexpectedly, judge, worked_unexpectedly


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
    RunDir(rundir).audit_dir.mkdir(exist_ok=True)


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
                if accepts(str(RunDir(root).xenstored_socket)):
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
                await end_processes(stray)
                problems.append(f"device models left running: pids {stray}")
        results = judge(root, observed, problems)
    finally:
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return DemoOutcome(results, root, time.monotonic() - t0, problems)

"""``physmap-lab audit``: run the matrix with progress on stderr; table, JSON or report out."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.markup import escape

from ..demo import Case, StepError
from ..progress import Ticker, table_console
from .enforce import ENFORCED_DEVICES, EnforcedCell, as_json, plan
from .privilege import Permission
from .report import SCREENS_DIR, enforced_table, matrix_table, write_out
from .runner import (
    DEVICES,
    DMS,
    MODES,
    QEMUS,
    TOOLSTACKS,
    AuditOutcome,
    derived_sets,
    matrix,
    run_audit,
    run_enforced,
)

Enforced = tuple[dict[str, list[Permission]], list[EnforcedCell], list[str]]


def run(args: argparse.Namespace, err: Console, argv: Sequence[str] | None) -> int:
    if getattr(args, "migration_cells", False):
        from .migrate_main import run as run_migration_cells

        return run_migration_cells(args, err, argv)
    cases = matrix(
        args.toolstacks or TOOLSTACKS,
        args.modes or MODES,
        args.devices or DEVICES,
        args.dms or DMS,
        args.qemus or QEMUS,
    )
    t0 = time.monotonic()
    ran = _run_matrix(args, cases, err)
    if ran is None:
        return 1
    outcome, (derived, enforced, enforce_problems) = ran
    _print_tables(args, outcome, derived, enforced)
    if args.out:
        command = "physmap-lab " + shlex.join(list(argv or ["audit"]))
        written = write_out(
            Path(args.out), outcome.scenarios, args.repeats, command, (derived, enforced)
        )
        for f in written:
            err.print(f"wrote {f}", highlight=False)
    wrong = _report_problems(err, outcome, enforced, enforce_problems)
    err.print(
        f"{len(outcome.scenarios)} cells in {outcome.seconds:.1f} s, "
        f"{len(enforced)} enforced cells in {time.monotonic() - t0 - outcome.seconds:.1f} s",
        highlight=False,
    )
    return 1 if wrong else 0


def _run_matrix(
    args: argparse.Namespace, cases: list[Case], err: Console
) -> tuple[AuditOutcome, Enforced] | None:
    """The matrix, then least privilege enforced, under one progress bar; None (said on
    ``err``) if the stack could not run."""
    total = len(cases) * args.repeats
    with Ticker(err, total, "audit") as progress:

        def step(message: str) -> None:
            progress.advance(message)

        chosen = args.devices or DEVICES
        enforced_devices = [d for d in ENFORCED_DEVICES if d in chosen] or list(chosen)

        async def both() -> tuple[AuditOutcome, Enforced]:
            shots = Path(args.out) / SCREENS_DIR if args.out else None
            outcome = await run_audit(cases, repeats=args.repeats, screenshots=shots, progress=step)
            # Least privilege, enforced: the derived sets, granted to a stub device model.
            derived = derived_sets(outcome.scenarios)
            variants = plan(derived, enforced_devices)
            progress.grow(len(variants))
            cells, problems = await run_enforced(variants, progress=step)
            return outcome, (derived, cells, problems)

        try:
            return trio.run(both)
        except StepError as exc:
            err.print(f"[red]physmap-lab audit: error:[/red] {escape(str(exc))}")
            return None


def _print_tables(
    args: argparse.Namespace,
    outcome: AuditOutcome,
    derived: dict[str, list[Permission]],
    enforced: list[EnforcedCell],
) -> None:
    """The matrix and the enforced cells on stdout: JSON, or tables."""
    if args.json:
        doc = {
            "scenarios": [s.as_json() for s in outcome.scenarios],
            "least_privilege_enforced": as_json(derived, enforced),
        }
        print(json.dumps(doc, indent=2))
    else:
        out = table_console()
        out.print(matrix_table(outcome.scenarios))
        if enforced:
            out.print(enforced_table(enforced))


def _report_problems(
    err: Console, outcome: AuditOutcome, enforced: list[EnforcedCell], enforce_problems: list[str]
) -> bool:
    """Say on ``err`` what went wrong and which cells are not as predicted; whether any."""
    problems = [*outcome.problems, *enforce_problems]
    for problem in problems:
        err.print(f"[red]{escape(problem)}[/red]", highlight=False)
    unexpected = [s for s in outcome.scenarios if s.outcome != s.expected]
    for s in unexpected:
        err.print(f"[red]{s.label}: {s.outcome}, not as the facts predict[/red]", highlight=False)
    off = [c for c in enforced if c.outcome != c.expected]
    for c in off:
        err.print(
            f"[red]{c.variant.label}: {c.outcome}, not as the facts predict[/red]",
            highlight=False,
        )
    return bool(problems or unexpected or off)

"""``physmap-lab audit``: run the matrix with progress on stderr; table, JSON or report out."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..demo import StepError
from .report import matrix_table, write_out
from .runner import DEVICES, DMS, MODES, TOOLSTACKS, AuditOutcome, matrix, run_audit


def run(args: argparse.Namespace, err: Console, argv: Sequence[str] | None) -> int:
    cases = matrix(
        args.toolstacks or TOOLSTACKS,
        args.modes or MODES,
        args.devices or DEVICES,
        args.dms or DMS,
    )
    total = len(cases) * args.repeats
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("audit", total=total)

        def step(message: str) -> None:
            progress.update(task, advance=1, description=escape(message))

        try:
            outcome: AuditOutcome = trio.run(
                lambda: run_audit(cases, repeats=args.repeats, progress=step)
            )
        except StepError as exc:
            err.print(f"[red]physmap-lab audit: error:[/red] {escape(str(exc))}")
            return 1
    if args.json:
        print(json.dumps({"scenarios": [s.as_json() for s in outcome.scenarios]}, indent=2))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=400)
        out.print(matrix_table(outcome.scenarios))
    if args.out:
        command = "physmap-lab " + shlex.join(list(argv or ["audit"]))
        for f in write_out(Path(args.out), outcome.scenarios, args.repeats, command):
            err.print(f"wrote {f}", highlight=False)
    for problem in outcome.problems:
        err.print(f"[red]{escape(problem)}[/red]", highlight=False)
    unexpected = [s for s in outcome.scenarios if s.outcome != s.expected]
    for s in unexpected:
        err.print(f"[red]{s.label}: {s.outcome}, not as the facts predict[/red]", highlight=False)
    err.print(f"{len(outcome.scenarios)} cells in {outcome.seconds:.1f} s", highlight=False)
    return 1 if outcome.problems or unexpected else 0

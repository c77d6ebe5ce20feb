"""``physmap-lab audit --migrate``: the migration cells, with progress on stderr; a table, JSON
or ``migration.md`` out."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.markup import escape

from ..demo import StepError
from ..progress import Ticker, table_console
from .migrate import migration_matrix
from .migrate_report import migration_table, write_out
from .migrate_runner import MigrationOutcome, run_migration_audit
from .runner import DEVICES, MODES, TOOLSTACKS
from .scenario import expected_outcome


def run(args: argparse.Namespace, err: Console, argv: Sequence[str] | None) -> int:
    if args.dms or args.qemus or args.repeats != 1:
        err.print(
            "[red]physmap-lab audit: error:[/red] --migrate runs each cell once with a "
            "privileged device model as QEMU 2.10; --dm, --qemu and --repeats do not apply"
        )
        return 2
    cases = migration_matrix(
        args.toolstacks or TOOLSTACKS, args.modes or MODES, args.devices or DEVICES
    )
    if not cases:
        err.print(
            "[red]physmap-lab audit: error:[/red] no migration cell: a toolstack other than "
            "libxl migrates only in compat mode"
        )
        return 2
    twins = sum(expected_outcome(c) != "intact" for c in cases)
    with Ticker(err, len(cases) + twins, "audit --migrate") as progress:
        try:
            outcome: MigrationOutcome = trio.run(
                lambda: run_migration_audit(cases, progress=progress.advance)
            )
        except StepError as exc:
            err.print(f"[red]physmap-lab audit: error:[/red] {escape(str(exc))}")
            return 1
    if args.json:
        doc = {
            "migration": [c.as_json() for c in outcome.cells],
            "restore_twins": [s.as_json() for s in outcome.twins],
        }
        print(json.dumps(doc, indent=2))
    else:
        out = table_console()
        out.print(migration_table(outcome.cells))
    if args.out:
        command = "physmap-lab " + shlex.join(list(argv or ["audit", "--migrate"]))
        for f in write_out(Path(args.out), outcome.cells, command):
            err.print(f"wrote {f}", highlight=False)
    for problem in outcome.problems:
        err.print(f"[red]{escape(problem)}[/red]", highlight=False)
    unexpected = [c for c in outcome.cells if c.outcome != c.expected]
    for c in unexpected:
        err.print(f"[red]{c.label}: {c.outcome}, not as the facts predict[/red]", highlight=False)
    err.print(
        f"{len(outcome.cells)} migration cells and {len(outcome.twins)} save/restore twin(s) "
        f"in {outcome.seconds:.1f} s",
        highlight=False,
    )
    return 1 if outcome.problems or unexpected else 0

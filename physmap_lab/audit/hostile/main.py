"""``physmap-lab audit --hostile``: run the attack matrix; table, JSON or report out."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

import trio
from rich.console import Console
from rich.markup import escape

from ...demo import StepError
from ...progress import table_console
from ..report import SCREENS_DIR
from .configs import BY_NAME, CONFIGS
from .report import markdown, svg, table
from .runner import run_hostile

REPORT: str = "hostile.md"
PICTURE: str = "hostile.svg"


def run(args: argparse.Namespace, err: Console, argv: Sequence[str] | None) -> int:
    configs = [BY_NAME[n] for n in args.configs] if args.configs else list(CONFIGS)
    shots = Path(args.out) / SCREENS_DIR if args.out else None
    try:
        runs = trio.run(lambda: run_hostile(configs, shots=shots, progress=lambda m: err.print(m)))
    except (StepError, OSError) as exc:
        err.print(f"[red]physmap-lab audit --hostile: error:[/red] {escape(str(exc))}")
        return 1
    if args.json:
        doc = {
            "hostile": [
                {
                    "config": r.config.name,
                    "principal": None if r.principal is None else vars_of(r.principal),
                    "domids": r.domids,
                    "error": r.error,
                    "seconds": round(r.seconds, 2),
                    "screens": r.screens,
                    "attacks": [c.as_json() for c in r.cells],
                }
                for r in runs
            ]
        }
        print(json.dumps(doc, indent=2))
    else:
        out = table_console()
        out.print(table(runs))
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        command = "physmap-lab " + shlex.join(list(argv or ["audit", "--hostile"]))
        (d / REPORT).write_text(
            "\n".join(["# Hostile device model audit", "", *markdown(runs, command)]) + "\n"
        )
        (d / PICTURE).write_text(svg(runs))
        err.print(f"wrote {d / REPORT}\nwrote {d / PICTURE}", highlight=False)
    bad = [f"{r.config.name}: {r.error}" for r in runs if r.error]
    bad += [
        f"{c.config}: {c.label}: {c.result} {c.errno or ''}, predicted {c.predicted.as_json()}"
        for r in runs
        for c in r.cells
        if not c.as_predicted
    ]
    for b in bad:
        err.print(f"[red]{escape(b)}[/red]", highlight=False)
    return 1 if bad else 0


def vars_of(p: object) -> dict[str, object]:
    return {k: getattr(p, k) for k in ("xenstore", "domid", "target", "hypervisor_to")}

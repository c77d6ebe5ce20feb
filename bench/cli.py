"""The command line of ``bench/run.py``."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from xenstored_sim.compiled import build_kind

from . import attack, migration, saverestore, scale, screen, throughput
from .daemons import BenchError, oracle_present
from .results import SECTIONS, Results, print_comparison, print_targets

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Measure the performance targets and write a JSON report.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for smoke tests")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section")
    p.add_argument("--no-oracle", action="store_true", help="do not start C xenstored")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    use_oracle = not args.no_oracle and oracle_present()
    results = Results(
        quick=args.quick,
        oracle=use_oracle,
        command=["bench/run.py", *(sys.argv[1:] if argv is None else argv)],
        build=build_kind(),  # the daemons started here inherit this environment
    )
    wanted = args.only or list(SECTIONS)
    if not use_oracle:
        why = "--no-oracle" if args.no_oracle else "../shared/oracle is absent"
        console.print(f"[yellow]C xenstored not used ({why}): ratios are unavailable[/yellow]")
    for section in SECTIONS:
        if section not in wanted:
            continue
        console.rule(section)
        try:
            if section == "throughput":
                sz = throughput.QUICK if args.quick else throughput.FULL
                results.sections[section] = throughput.measure(results, sz, use_oracle)
                print_comparison(
                    console,
                    "Closed loop and test-xenstore, pinned to CPU 0 (side by side)",
                    throughput.comparison_rows(results.sections[section]),
                )
            elif section == "scale":
                results.sections[section] = scale.measure(
                    results, scale.QUICK if args.quick else scale.FULL
                )
            elif section == "migration":
                results.sections[section] = migration.measure(
                    results, migration.QUICK if args.quick else migration.FULL
                )
            elif section == "screen":
                results.sections[section] = screen.measure(
                    results, screen.QUICK if args.quick else screen.FULL
                )
            elif section == "attack":
                results.sections[section] = attack.measure(
                    results, attack.QUICK if args.quick else attack.FULL
                )
            else:
                results.sections[section] = saverestore.measure(
                    results, saverestore.QUICK if args.quick else saverestore.FULL
                )
        except (BenchError, OSError, ValueError) as exc:
            results.errors[section] = f"{type(exc).__name__}: {exc}"
            console.print(traceback.format_exc(), style="dim")
        results.write(args.output)
    print_targets(console, results)
    results.write(args.output)
    console.print(f"results: {args.output}")
    return 1 if results.errors else 0

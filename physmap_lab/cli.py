"""``physmap-lab``: run the simulated Xen host's demo.

::

    physmap-lab demo [--json] [--wide] [--mode M ...] [--device D ...] [--toolstack T ...]
                     [--rundir DIR] [--attach] [--keep] [--screenshots DIR]
    physmap-lab demo --migrate [--json] [--mode M ...] [--device D ...] [--rundir DIR] [--keep]
    physmap-lab host up|down NAME [--rundir DIR]

Progress goes to stderr as the demo runs; then a table (or, with ``--json``, only
``{"runs": [...]}``) goes to stdout.  The exit status is 1 if a case that should work did not,
or if the run left anything behind, and 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio
from rich.console import Console
from rich.markup import escape

from toolstack.config import DM_MODES, DM_QEMU_VERSIONS, FLAVOURS, VGA_CHOICES
from xenstored_sim.startup import OneLineParser

from .demo import (
    DEFAULT_DEVICES,
    DEFAULT_MODES,
    DEFAULT_QEMU,
    DEFAULT_TOOLSTACKS,
    Case,
    DemoOutcome,
    StepError,
    expected_to_work,
    failed_unexpectedly,
    plan,
    run_demo,
    worked_unexpectedly,
)
from .progress import Ticker, table_console
from .table import results_table

PROG: Final = "physmap-lab"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="A simulated Xen host that saves and restores QEMU's VRAM."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_audit(sub)
    _add_host(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="save and restore a guest's framebuffer in each device-model mode",
        description="For each mode and device: create, the guest maps the VGA BAR and draws, "
        "save, destroy, restore, and the framebuffer is read back.",
    )
    p.add_argument("--json", action="store_true", help='print only {"runs": [...]} on stdout')
    _add_demo_cases(p)
    _add_demo_run(p)


def _add_demo_cases(p: argparse.ArgumentParser) -> None:
    """Which cases: modes, devices, toolstack flavours and QEMUs (every combination)."""
    p.add_argument(
        "--mode",
        dest="modes",
        action="extend",
        nargs="+",
        choices=DM_MODES,
        metavar="M",
        help=f"device-model modes: {', '.join(DM_MODES)} (default: {' '.join(DEFAULT_MODES)})",
    )
    p.add_argument(
        "--device",
        dest="devices",
        action="extend",
        nargs="+",
        choices=VGA_CHOICES,
        metavar="D",
        help=f"VGA devices: {', '.join(VGA_CHOICES)} (default: all)",
    )
    p.add_argument(
        "--toolstack",
        dest="toolstacks",
        action="extend",
        nargs="+",
        choices=FLAVOURS,
        metavar="T",
        help=f"toolstack flavours: {', '.join(FLAVOURS)} (default: libxl)",
    )
    _add_qemu(p, f"default: {DEFAULT_QEMU}, the release that merged the series")


def _add_demo_run(p: argparse.ArgumentParser) -> None:
    """Where and how the cases run, and what the demo leaves behind."""
    p.add_argument(
        "--rundir",
        metavar="DIR",
        help="the run directory (default: a new temporary directory, removed after)",
    )
    p.add_argument(
        "--attach",
        action="store_true",
        help="use the xenstored-sim and hypervisor-sim already running on --rundir",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory and the images")
    p.add_argument(
        "--wide",
        action="store_true",
        help="the table with full digests and pointers (about 160 columns)",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="instead of save/restore, migrate each case live between two hosts (in two "
        "network namespaces when run as root) while the guest keeps drawing",
    )
    p.add_argument(
        "--screenshots",
        metavar="DIR",
        help="write a PNG of each guest's screen before save and after restore (QMP "
        "screendump) to DIR",
    )


def _add_qemu(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--qemu",
        dest="qemus",
        action="extend",
        nargs="+",
        choices=DM_QEMU_VERSIONS,
        metavar="V",
        help=f"the QEMU the device model behaves as: {', '.join(DM_QEMU_VERSIONS)} ({default})",
    )


def _add_host(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    p = sub.add_parser(
        "host",
        help="start or stop one simulated host (a run directory with its own daemons)",
        description="up: start xenstored-sim and hypervisor-sim for host NAME in the "
        "background and print its run directory; down: destroy its domains and stop it.",
    )
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("name", type=_host_name)
    p.add_argument(
        "--rundir",
        metavar="DIR",
        help="the host's run directory (default: $PHYSMAP_LAB_HOSTS/NAME or "
        "<tmp>/physmap-lab-hosts/NAME)",
    )


def _host_name(name: str) -> str:
    from .host import HostError, check_name

    try:
        return check_name(name)
    except HostError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host(args: argparse.Namespace) -> int:
    from . import host

    try:
        rundir = (
            Path(args.rundir) if args.rundir else host.default_rundir(host.check_name(args.name))
        )
        if args.action == "up":
            if problem := _unusable_dir(str(rundir)):
                raise host.HostError(f"{rundir}: {problem}")
            print(host.up(args.name, rundir))
        elif not host.down(args.name, rundir):
            print(f"{PROG}: host {args.name} is not running on {rundir}", file=sys.stderr)
            return 1
    except (host.HostError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_audit(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    from .audit.runner import DEVICES, DMS, MODES, QEMUS, TOOLSTACKS

    p = sub.add_parser(
        "audit",
        help="privilege audit and coupling matrix of the physmap across save and restore",
        description="Run toolstack x mode x device x device model through create, map, save "
        "and restore, and report who made which xenstore requests.",
    )
    p.add_argument("--json", action="store_true", help='print only {"scenarios": [...]}')
    p.add_argument("--out", metavar="DIR", help="write report.md and SVG pictures to DIR")
    p.add_argument("--repeats", type=int, default=1, metavar="N", help="runs per cell (medians)")
    from .audit.hostile.configs import BY_NAME as HOSTILE_CONFIGS

    p.add_argument(
        "--hostile",
        action="store_true",
        help="instead: run qemu-model --hostile's attacks in each device-model configuration",
    )
    p.add_argument(
        "--config",
        dest="configs",
        action="extend",
        nargs="+",
        choices=list(HOSTILE_CONFIGS),
        metavar="C",
        help=f"with --hostile: {', '.join(HOSTILE_CONFIGS)} (default: all)",
    )
    for name, choices in (
        ("toolstack", TOOLSTACKS),
        ("mode", MODES),
        ("device", DEVICES),
        ("dm", DMS),
    ):
        p.add_argument(
            f"--{name}",
            dest=f"{name}s",
            action="extend",
            nargs="+",
            choices=choices,
            metavar=name[0].upper(),
            help=f"{', '.join(choices)} (default: all)",
        )
    _add_qemu(p, f"default: {' and '.join(QEMUS)}; a privileged device model runs as the first")
    p.add_argument(
        "--migrate",
        dest="migration_cells",
        action="store_true",
        help="instead: migrate each mode x device live between two hosts (migration.md)",
    )


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _run_migrate(args: argparse.Namespace, err: Console) -> int:
    import tempfile

    from .migration import run_migrations

    cases = plan(
        args.modes or DEFAULT_MODES,
        args.devices or DEFAULT_DEVICES,
        args.toolstacks or DEFAULT_TOOLSTACKS,
    )
    err.print(f"[bold]physmap-lab demo --migrate[/bold]: {_cases(len(cases))}", highlight=False)
    base = Path(args.rundir or tempfile.mkdtemp(prefix="physmap-lab-migrate-"))
    try:
        results = trio.run(lambda: run_migrations(cases, base))
    except (RuntimeError, OSError) as exc:
        err.print(f"[red]{PROG}: error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print(f"[red]{PROG}: interrupted[/red]")
        return 1
    finally:
        if not (args.keep or args.rundir):
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps({"runs": [r.as_json() for r in results]}, indent=2))
    bad = 0
    for case, r in zip(cases, results, strict=True):
        should = expected_to_work(case)
        bad += r.ok != should
        line = (
            f"{r.mode}/{r.device}/{r.toolstack} {r.source_host}->{r.destination_host} "
            f"({r.network}): {'ok' if r.ok else 'FAILED'}; {r.precopy_rounds} rounds, "
            f"{r.pages_sent} pages, {r.frames_drawn} frames drawn, downtime "
            f"{r.downtime_s or 0:.3f} s, total {r.total_s or 0:.2f} s"
        )
        err.print(escape(line) + (f": {escape(r.error)}" if r.error else ""), highlight=False)
    err.print(f"{_cases(len(results))}, {len(results) - bad} as expected", highlight=False)
    return 1 if bad else 0


def _run(args: argparse.Namespace, err: Console) -> int:
    if args.migrate:
        return _run_migrate(args, err)
    cases = plan(
        args.modes or DEFAULT_MODES,
        args.devices or DEFAULT_DEVICES,
        args.toolstacks or DEFAULT_TOOLSTACKS,
        args.qemus or [DEFAULT_QEMU],
    )

    err.print(f"[bold]physmap-lab demo[/bold]: {_cases(len(cases))}", highlight=False)
    outcome = _run_cases(cases, args, err)
    if outcome is None:
        return 1
    _print_outcome(outcome, args, err)
    return outcome.exit_status


def _run_cases(cases: list[Case], args: argparse.Namespace, err: Console) -> DemoOutcome | None:
    """Run the demo under a progress bar; None (said on ``err``) if it could not run."""
    # The demo announces each case with "LABEL: start": the bar counts the cases begun.
    starts = {f"{c.label}: [bold]start[/bold]": c.label for c in cases}
    with Ticker(err, len(cases), "demo") as progress:

        def report(message: str) -> None:
            progress.note(message)
            if message in starts:
                if message != next(iter(starts)):
                    progress.advance()
                progress.step(starts[message])

        try:
            outcome: DemoOutcome = trio.run(
                lambda: run_demo(
                    cases,
                    rundir=args.rundir,
                    attach=args.attach,
                    keep=args.keep,
                    screenshots=args.screenshots,
                    report=report,
                )
            )
        except StepError as exc:
            err.print(f"[red]{PROG}: error:[/red] {escape(str(exc))}", highlight=False)
            return None
        except KeyboardInterrupt:
            err.print(f"[red]{PROG}: interrupted[/red]")
            return None
        progress.advance()
    return outcome


def _print_outcome(outcome: DemoOutcome, args: argparse.Namespace, err: Console) -> None:
    """The table (or JSON) on stdout; errors, problems and the summary on ``err``."""
    if args.json:
        print(json.dumps({"runs": [r.as_json() for r in outcome.results]}, indent=2))
    else:
        out = table_console(400 if args.wide else 100)
        out.print(results_table(outcome.results, wide=args.wide))
    for r in outcome.results:
        if r.error:
            label = f"{r.mode}/{r.device}/{r.toolstack}"
            err.print(f"{label}: {escape(r.error)}", highlight=False, style="red")
    for problem in outcome.problems:
        err.print(f"[red]{escape(problem)}[/red]", highlight=False)
    bad = failed_unexpectedly(outcome.results)
    ok = sum(r.ok for r in outcome.results)
    err.print(
        f"{_cases(len(outcome.results))}, {ok} ok, {len(bad)} failed unexpectedly, "
        f"in {outcome.seconds:.1f} s",
        highlight=False,
    )
    for r in worked_unexpectedly(outcome.results):
        err.print(
            f"[red]{r.mode}/{r.device}/{r.toolstack}: restored intact, "
            f"but this case must break[/red]",
            highlight=False,
        )
    if args.keep or args.rundir:
        err.print(f"run directory: {outcome.rundir}", highlight=False)
    if args.screenshots:
        err.print(f"screenshots: {Path(args.screenshots).resolve()}", highlight=False)


def _unusable_dir(path: str) -> str | None:
    """Why ``path`` cannot serve as a directory to write into (created if missing)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return "not a directory"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "attach", False) and not args.rundir:
        parser.error("--attach needs --rundir: the directory the daemons run on")
    if getattr(args, "migrate", False) and (args.attach or args.screenshots):
        parser.error("--migrate starts its own two hosts and takes no --attach or --screenshots")
    # host down only looks for a running host: it creates nothing
    stopping = getattr(args, "action", None) == "down"
    for flag, path in ((f, getattr(args, f[2:], None)) for f in ("--rundir", "--out")):
        if path and not stopping and (problem := _unusable_dir(path)):
            print(f"{PROG}: error: {flag} {path}: {problem}", file=sys.stderr)
            return 1
    if args.command == "demo":
        return _run(args, Console(stderr=True, soft_wrap=True))
    if args.command == "host":
        return _host(args)
    if args.command == "audit":
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        if args.hostile and args.migration_cells:
            parser.error("--hostile and --migrate are separate runs")
        if args.hostile:
            from .audit.hostile.main import run as run_hostile_command

            return run_hostile_command(
                args, Console(stderr=True, soft_wrap=True), sys.argv[1:] if argv is None else argv
            )
        if args.configs:
            parser.error("--config needs --hostile")
        from .audit.main import run as run_audit_command

        return run_audit_command(
            args, Console(stderr=True, soft_wrap=True), sys.argv[1:] if argv is None else argv
        )
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())

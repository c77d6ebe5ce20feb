"""Running the fuzz targets on private stacks: ``python -m physmap_lab.fuzz
[--target toolstack|devicemodel|hypervisor|xenstored|all] [--frames N] [--seed S]``."""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from toolstack import devicemodel
from toolstack.config import DomainConfig
from toolstack.libxl import open_libxl
from xenhost import RunDir, stop_device_models

from ..stack import Stack, open_stack
from .devicemodel import QmpLines, fuzz_qmp
from .hypervisor import fuzz_hypervisor
from .report import PROGRESS_LIMIT, FuzzReport
from .toolstack import fuzz_image_parser, fuzz_restores
from .xenstored import run

# --------------------------------------------------------------------------------------------
# Running the targets


def _traceback_in(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return text[-2000:] if "Traceback" in text else None


@dataclass
class _Plan:
    """How much of each kind of input one run sends."""

    frames: int
    lines: int
    images: int
    seed: int
    max_nesting: int


async def _device_model_target(plan: _Plan, rundir: Path, scratch: Path) -> FuzzReport:
    """QMP fuzz of a device model the toolstack built, then its health."""
    async with open_libxl(rundir, command="fuzz") as lx:
        created = await lx.create(DomainConfig(name="fuzz-dm", memory_mib=16))
    domid, pid = created.domid, created.dm_pid
    qmp = RunDir(rundir).qmp_socket(domid)
    report = await fuzz_qmp(qmp, plan.lines, plan.seed, scratch, max_nesting=plan.max_nesting)
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError):
        with trio.fail_after(PROGRESS_LIMIT):
            stream = await trio.open_unix_socket(str(qmp))
            async with stream:
                q = QmpLines(stream)
                await q.reply()
                await q.execute("qmp_capabilities")
                info = await q.execute("x-physmap-info")
                if "return" not in info:
                    report.problems.append(f"x-physmap-info failed: {info}")
                report.good_requests += 1
    if not devicemodel.pid_alive(pid):
        report.crashes += 1
        report.problems.append("qemu-model died")
    tail = _traceback_in(RunDir(rundir).dm_log(domid))
    if tail is not None:
        report.crashes += 1
        report.problems.append(f"qemu-model logged a traceback:\n{tail}")
    async with open_libxl(rundir, command="fuzz") as lx:
        await lx.destroy(domid)
    return report


async def _toolstack_target(plan: _Plan, stack: Stack, scratch: Path) -> FuzzReport:
    """Mutations of a real save image through the parser, then through ``xl-sim restore``."""
    image_path = scratch / "good.img"
    async with open_libxl(stack.rundir, command="fuzz") as lx:
        created = await lx.create(DomainConfig(name="fuzz-image", memory_mib=16))
        await lx.save(created.domid, image_path)
    image = image_path.read_bytes()
    report = fuzz_image_parser(image, max(plan.images * 20, 1), plan.seed)
    if report.ok:
        more = await fuzz_restores(stack, image, plan.images, plan.seed, scratch)
        report.frames += more.frames
        report.good_requests += more.good_requests
        report.dropped += more.dropped
        report.crashes += more.crashes
        report.problems += more.problems
        report.seconds += more.seconds
        report.connections = more.frames
    return report


async def _stack_targets(
    reports: dict[str, FuzzReport], targets: Sequence[str], plan: _Plan, tmp: Path
) -> None:
    """Fuzz ``targets`` on one stack, filling ``reports`` as each finishes."""
    rundir = tmp / "run"
    async with open_stack(rundir) as stack:
        hv = stack.daemons["hypervisor"]
        if "hypervisor" in targets:
            report = await fuzz_hypervisor(stack.hypervisor_socket, plan.frames, plan.seed)
            if hv.process is None or hv.process.poll() is not None:
                report.crashes += 1
                report.problems.append("hypervisor-sim died")
            reports["hypervisor"] = report
        if "devicemodel" in targets:
            reports["devicemodel"] = await _device_model_target(plan, rundir, tmp / "dm")
        if "toolstack" in targets:
            reports["toolstack"] = await _toolstack_target(plan, stack, tmp)
        tail = _traceback_in(rundir / "logs" / "hypervisor.log")
        if tail is not None and "hypervisor" in reports:
            reports["hypervisor"].crashes += 1
            reports["hypervisor"].problems.append(f"hypervisor-sim logged a traceback:\n{tail}")


def run_targets(
    targets: Sequence[str],
    frames: int,
    seed: int,
    *,
    lines: int,
    images: int,
    max_nesting: int = 5000,
) -> dict[str, FuzzReport]:
    """Fuzz each of ``targets`` on a private stack; one report each."""
    reports: dict[str, FuzzReport] = {}
    rest = [t for t in targets if t != "xenstored"]
    if rest:
        with tempfile.TemporaryDirectory(prefix="stack-fuzz-") as tmp:
            try:
                plan = _Plan(frames, lines, images, seed, max_nesting)
                trio.run(_stack_targets, reports, rest, plan, Path(tmp))
            except Exception as exc:  # a daemon gone or a harness failure: the run failed
                why = f"the run stopped: {type(exc).__name__}: {exc}"
                for name in rest:
                    if name not in reports:
                        reports[name] = FuzzReport(problems=[why])
                        break
            finally:
                stop_device_models(Path(tmp) / "run", grace=0)
    if "xenstored" in targets:
        try:
            reports["xenstored"] = run(frames, seed)
        except Exception as exc:
            reports["xenstored"] = FuzzReport(
                problems=[f"the run stopped: {type(exc).__name__}: {exc}"]
            )
    return reports


TARGETS: Final = ("toolstack", "devicemodel", "hypervisor", "xenstored")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m physmap_lab.fuzz",
        description="Fuzz the stack's daemons and parsers over their real interfaces.",
    )
    parser.add_argument(
        "--target", choices=(*TARGETS, "all"), default="all", help="what to fuzz (default: all)"
    )
    parser.add_argument(
        "--frames", type=int, default=100_000, help="xenstore and hypercall frames to send"
    )
    parser.add_argument(
        "--lines", type=int, default=None, help="QMP lines to send (default: frames / 20)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="mutated images through xl-sim restore (default: frames / 20000, 5 to 200); "
        "twenty times as many go through the parser alone",
    )
    parser.add_argument(
        "--qmp-max-nesting",
        type=int,
        default=5000,
        help="deepest JSON nesting sent to QMP (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    targets = TARGETS if args.target == "all" else (args.target,)
    lines = args.lines if args.lines is not None else max(args.frames // 20, 1)
    images = args.images if args.images is not None else min(max(args.frames // 20000, 5), 200)
    print(f"fuzz: seed={seed} targets={','.join(targets)}", flush=True)
    reports = run_targets(
        targets, args.frames, seed, lines=lines, images=images, max_nesting=args.qmp_max_nesting
    )
    for name in targets:
        print(f"{name}: {reports[name].summary()}", flush=True)
    return 0 if all(r.ok for r in reports.values()) else 1

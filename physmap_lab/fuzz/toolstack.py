"""Fuzzing the toolstack's save-image parser and ``xl-sim restore``.

Mutated save images go through the parser (only ``StreamError`` may escape), and a share of them
through ``xl-sim restore``, which must exit 0 or 1 with a message, never a traceback, and after a
failure leave no domain, xenstore tree or device model behind.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from hypervisor_sim.client import open_hypervisor
from toolstack.image import copy_emulator_context, read_image
from toolstack.libxl import open_libxl
from toolstack.streamio import StreamError
from xenhost import RunDir, xl_json_argv
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

from ..stack import Stack, executable
from .generators import ImageMutator
from .report import FuzzReport


def parse_image_bytes(data: bytes) -> str | None:
    """Check ``data`` the way a restore does first: None if it is accepted, else the message.
    Any error but :class:`StreamError` propagates: that is the fuzz's finding."""
    f = io.BytesIO(data)
    try:
        index = read_image(f)
        copy_emulator_context(f, index, io.BytesIO())
    except StreamError as exc:
        return str(exc)
    return None


@dataclass
class RestoreOutcome:
    rc: int
    error: str | None
    traceback: bool
    domid: int | None = None


async def restore_image(rundir: Path, image: Path, env: dict[str, str]) -> RestoreOutcome:
    """``xl-sim restore image`` as its own process."""
    proc = await trio.run_process(
        xl_json_argv(rundir, "restore", str(image), program=executable("xl-sim")),
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    try:
        out = json.loads(proc.stdout or b"{}")
    except ValueError:
        out = {"error": None}
    err = proc.stderr.decode(errors="replace")
    domid = out.get("domid")
    return RestoreOutcome(
        proc.returncode,
        out.get("error"),
        "Traceback" in err,
        domid if isinstance(domid, int) else None,
    )


async def leftovers(stack: Stack) -> list[str]:
    """Anything a failed restore may have left: domains, xenstore trees, device models."""
    found: list[str] = []
    async with open_hypervisor(stack.hypervisor_socket) as hv:
        found += [f"domain {d['domid']}" for d in await hv.domain_list()]
    async with open_xenstore(str(stack.xenstored_socket)) as xs:
        for path in ("/local/domain", "/libxl", "/local/domain/0/device-model"):
            try:
                names = await xs.directory(path)
            except XsError:
                continue
            found += [f"{path}/{n}" for n in names if n != "0"]
    qmp = RunDir(stack.rundir).qmp_dir
    if qmp.exists():
        found += [str(p) for p in qmp.iterdir()]
    return found


async def fuzz_restores(
    stack: Stack, image: bytes, count: int, seed: int, scratch: Path
) -> FuzzReport:
    """``count`` mutated copies of ``image`` through ``xl-sim restore`` on ``stack``."""
    report = FuzzReport()
    start = time.monotonic()
    rng = ImageMutator(seed)
    path = scratch / "mutated.img"
    before = set(await leftovers(stack))
    for _ in range(count):
        data = rng.mutate(image)
        path.write_bytes(data)
        report.frames += 1
        outcome = await restore_image(stack.rundir, path, stack.env())
        if outcome.traceback or outcome.rc not in (0, 1):
            report.crashes += 1
            report.problems.append(f"xl-sim restore exited {outcome.rc} with a traceback")
        elif outcome.rc == 1 and not outcome.error:
            report.problems.append("xl-sim restore failed without a message")
        elif outcome.rc == 0:
            report.good_requests += 1
            # The damage was in guest memory, or padding: a domain that works.  Remove it.
            if outcome.domid is None:
                report.problems.append("xl-sim restore succeeded without naming its domain")
                break
            async with open_libxl(stack.rundir, command="fuzz") as lx:
                await lx.destroy(outcome.domid)
        else:
            report.dropped += 1
            left = sorted(set(await leftovers(stack)) - before)
            if left:
                report.problems.append(f"a failed restore left {', '.join(left)}")
        if report.problems:
            break
    report.seconds = time.monotonic() - start
    return report


def fuzz_image_parser(image: bytes, count: int, seed: int) -> FuzzReport:
    """``count`` mutated images through the parser (no processes)."""
    report = FuzzReport()
    start = time.monotonic()
    rng = ImageMutator(seed)
    for _ in range(count):
        data = rng.mutate(image)
        report.frames += 1
        try:
            why = parse_image_bytes(data)
        except Exception as exc:  # the finding: anything but StreamError
            report.crashes += 1
            report.problems.append(f"the image parser raised {type(exc).__name__}: {exc}")
            break
        if why is None:
            report.good_requests += 1
        else:
            report.dropped += 1
    report.seconds = time.monotonic() - start
    return report

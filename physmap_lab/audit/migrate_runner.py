"""The trio shell of the audit's migration cells: two hosts (``physmap-lab host up`` run
directories, side by side on 127.0.0.1 with ephemeral ports), every cell migrated from the
first to the second by :func:`physmap_lab.migration.run_case`, then both hosts' audit logs cut
by cell and phase (:mod:`.migrate`).  The cells the facts expect to fail are run as
save/restore cells too (:func:`.runner.run_audit`), so that each can be set beside its twin."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from xenhost import RunDir, device_models

from ..auditlog import AuditFormatError, read_hypervisor, read_toolstack, read_xenstored
from ..demo import Case, Reporter, StepError
from ..migration import Host, MigrationCase, run_case, two_hosts
from .migrate import (
    DESTINATION,
    SOURCE,
    HostLogs,
    MigrationCell,
    build_cell,
    match_restore,
    needs_restore_twin,
    restore_twin,
)
from .runner import run_audit
from .scenario import Scenario, expected_outcome


@dataclass
class MigrationOutcome:
    cells: list[MigrationCell]
    #: The save/restore cells the failing migration cells were set beside.
    twins: list[Scenario]
    problems: list[str]
    seconds: float


def host_logs(rundir: Path) -> HostLogs:
    run = RunDir(rundir)
    return HostLogs(
        list(read_xenstored(run.audit_log("xenstored"))),
        read_hypervisor(run.audit_log("hypervisor")),
        read_toolstack(run.audit_log("toolstack")),
    )


async def _migrate_all(
    cases: Sequence[Case], base: Path, progress: Reporter
) -> tuple[list[MigrationCase], dict[str, HostLogs], list[str]]:
    problems: list[str] = []
    results: list[MigrationCase] = []
    hosts: list[Host] = []
    tag = f"a{os.getpid() % 100000}{secrets.token_hex(2)}"
    try:
        async with two_hosts(base, tag=tag, use_netns=False) as (src, dst):
            hosts = [src, dst]
            for i, case in enumerate(cases, 1):
                progress(f"[{i}/{len(cases)}] migrate {case.mode}/{case.device}/{case.toolstack}")
                results.append(await run_case(case, src, dst))
                problems += await _left_behind(case, hosts)
            for h in hosts:
                problems += [f"{h.name}: device model left running: pid {p}" for p in _dms(h)]
    except (RuntimeError, OSError) as exc:
        raise StepError(f"cannot run the migration cells: {exc}") from None
    try:
        logs = {SOURCE: host_logs(hosts[0].rundir), DESTINATION: host_logs(hosts[1].rundir)}
    except (OSError, AuditFormatError) as exc:
        raise StepError(f"cannot read the hosts' audit logs: {exc}") from None
    return results, logs, problems


async def _left_behind(case: Case, hosts: Sequence[Host]) -> list[str]:
    """A domain a cell left on a host, destroyed so that the next cell starts clean."""
    problems = []
    for h in hosts:
        listed = await _xl(h, "list")
        for d in listed.get("domains", []):
            problems.append(f"{case.label}: left domain {d['domid']} on {h.name}")
            await _xl(h, "destroy", str(d["domid"]))
    return problems


async def _xl(h: Host, *args: str) -> dict[str, Any]:
    proc = await trio.run_process(h.xl(*args), capture_stdout=True, check=False)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else {}
    except ValueError:
        out = {}
    return out if isinstance(out, dict) else {}


def _dms(h: Host) -> list[int]:
    return device_models(h.rundir)


async def run_migration_audit(
    cases: Sequence[Case], *, progress: Reporter = lambda _m: None
) -> MigrationOutcome:
    """Migrate every case between two fresh hosts and build its cell; run the save/restore
    twin of each cell the facts expect to fail and set the two side by side."""
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="physmap-audit-migrate-")).resolve()
    try:
        results, logs, problems = await _migrate_all(cases, base, progress)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    cells = [build_cell(case, m, logs) for case, m in zip(cases, results, strict=True)]
    twin_cases = [c for c in cases if expected_outcome(c) != "intact"]
    twins: list[Scenario] = []
    if twin_cases:
        twins = (await run_audit(twin_cases, progress=progress)).scenarios
    for cell in cells:
        twin = restore_twin(cell, twins)
        if needs_restore_twin(cell) and twin is not None:
            cell.restore_match = match_restore(cell, twin)
            if not cell.restore_match.matches:
                problems.append(f"{cell.label}: does not fail as its restore cell {twin.label}")
    return MigrationOutcome(cells, twins, problems, time.monotonic() - t0)

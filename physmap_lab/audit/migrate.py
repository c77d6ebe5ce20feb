"""The migration cells of the audit: which principal on which host touches the physmap keys
while a domain migrates live from a source host to a destination host.

A cell is one case of ``physmap-lab demo --migrate`` (physmap_lab/migration.py): create on the
source, map the VGA BAR and draw, then ``xl-sim migrate`` pre-copies the memory to an
``xl-sim migrate-receive`` on the destination while the guest keeps drawing.  Each host keeps
its own audit logs; a cell cuts both by its time window and by the phases of a migration:

- ``boot`` and ``map``: create, and the guest mapping the BAR and drawing (source);
- ``precopy``: from ``xl-sim migrate`` to the source's ``domain_pause`` (libxl's suspend);
- ``stop-copy``: the last round, the device state and, in compat mode, the keys read for
  ``EMULATOR_XENSTORE_DATA`` (source), until the destination starts to restore;
- ``restore``: the destination builds the domain from the stream, plants the keys it carries
  (libxl: ``libxl__restore_emulator_xenstore_data``) and starts its device model;
- ``handover``: from the destination's ``domain_unpause`` on; the source destroys its copy;
- ``verify``: the audit's own look at the destination (not counted: the audit is no principal);
- ``destroy``: the migrated domain destroyed on the destination.

Pure: a case, what the migration saw and each host's audit records in; a
:class:`MigrationCell` out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ..auditlog import (
    HypercallRecord,
    PathClass,
    Principal,
    ToolstackRecord,
    XenstoreRequest,
)
from ..demo import Case
from ..migration import MigrationCase
from .phases import PhaseClock
from .scenario import PRINCIPALS, Scenario, expected_outcome

SOURCE: Final = "source"
DESTINATION: Final = "destination"
HOSTS: Final = (SOURCE, DESTINATION)
PHASES: Final = (
    "boot",
    "map",
    "precopy",
    "stop-copy",
    "restore",
    "handover",
    "verify",
    "destroy",
)
#: The audit's own reads of the destination are left out of a cell's accesses.
NOT_COUNTED: Final = frozenset({"verify"})
_DM_DOMID: Final = re.compile(r"/device-model/\d+(?=/|$)")
#: A device model's log line: ``qemu-model: ...`` or ``qemu-model[d2]: ...``.
_DM_LINE: Final = re.compile(r"qemu-model(?:\[d\d+\])?: (.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class HostLogs:
    """One host's audit records (``RUNDIR/audit/*.jsonl``)."""

    xenstore: Sequence[XenstoreRequest] = ()
    hypercalls: Sequence[HypercallRecord] = ()
    toolstack: Sequence[ToolstackRecord] = ()

    def window(self, w0: float, w1: float) -> HostLogs:
        return HostLogs(
            [r for r in self.xenstore if w0 <= r.t <= w1],
            [h for h in self.hypercalls if w0 <= h.t <= w1],
            [a for a in self.toolstack if w0 <= a.t <= w1],
        )


@dataclass(frozen=True, slots=True)
class PhysmapRequest:
    """One request on a physmap path, with the host it went to."""

    t: float
    host: str
    principal: str
    phase: str
    op: str
    #: The path with the guest's domid as ``$DOMID``.
    path: str
    result: str

    @property
    def shown(self) -> str:
        return f"{self.op} {self.path} -> {self.result}"


@dataclass(frozen=True, slots=True)
class HostAccess:
    """A group of a cell's xenstore requests: how many share these properties."""

    host: str
    principal: str
    phase: str
    path_class: str
    op: str
    ok: bool
    n: int


@dataclass(frozen=True, slots=True)
class RestoreMatch:
    """A failed migration cell beside the save/restore cell of the same case."""

    restore_cell: str
    same_outcome: bool
    #: The device model's last words, in the migration and in the restore.
    failure: str | None
    restore_failure: str | None
    #: The destination device model's physmap requests, and the restored one's.
    dm_requests: list[str]
    restore_dm_requests: list[str]

    @property
    def matches(self) -> bool:
        return (
            self.same_outcome
            and self.failure == self.restore_failure
            and self.dm_requests == self.restore_dm_requests
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "matches": self.matches}


@dataclass(slots=True)
class MigrationCell:
    mode: str
    device: str
    toolstack: str
    outcome: str
    expected: str
    migrated: bool
    fb_hash_matches: bool
    #: QXL's derived pointers on the destination still point into the VRAM.
    pointers_valid: bool | None
    error: str | None
    #: The device model's last log line when the migration failed on the destination.
    failure: str | None
    hosts: dict[str, str]
    keys_carried: dict[str, str]
    keys_planted: dict[str, str]
    #: Whether the destination's toolstack wrote every physmap key before it started the
    #: device model (``None`` when it wrote none).
    planted_before_dm: bool | None
    precopy_rounds: int
    pages_sent: int
    downtime_s: float | None
    total_s: float | None
    #: ``{host: {principal: n}}`` of xenstore requests, of physmap ones, of those that
    #: succeeded, and of hypercalls.
    xenstore_ops: dict[str, dict[str, int]]
    physmap_ops: dict[str, dict[str, int]]
    physmap_ops_ok: dict[str, dict[str, int]]
    hypercalls: dict[str, dict[str, int]]
    access: list[HostAccess]
    physmap_requests: list[PhysmapRequest]
    restore_match: RestoreMatch | None = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"migrate {self.mode}/{self.device}/{self.toolstack}"

    def as_json(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("access", "physmap_requests", "restore_match")
        }
        out["access"] = [asdict(a) for a in self.access]
        out["physmap_requests"] = [
            {k: v for k, v in asdict(r).items() if k != "t"} for r in self.physmap_requests
        ]
        out["restore_match"] = None if self.restore_match is None else self.restore_match.as_json()
        return out


# ------------------------------------------------------------------------------------ phases


def phase_marks(
    spans: Mapping[str, tuple[float, float]], src: HostLogs, dst: HostLogs, src_domid: int | None
) -> dict[str, float]:
    """When each phase of a cell began, from the runner's step spans and the hosts' records:
    the source's ``domain_pause`` of the domain (the suspend), the destination toolstack's
    first request after it (the restore) and the destination's ``domain_unpause``."""
    marks: dict[str, float] = {}
    for step, phase in (("create", "boot"), ("map", "map"), ("migrate", "precopy")):
        if step in spans:
            marks[phase] = spans[step][0]
    if "migrate" in spans:
        m0, m1 = spans["migrate"]
        pause = _first(
            h.t
            for h in src.hypercalls
            if h.call == "domain_pause" and h.domid == src_domid and m0 <= h.t <= m1
        )
        if pause is not None:
            marks["stop-copy"] = pause
            start = _first(
                t
                for t in sorted(
                    [r.t for r in dst.xenstore if r.is_request and _toolstack(r.principal)]
                    + [h.t for h in dst.hypercalls if _toolstack(h.principal)]
                )
                if pause < t <= m1
            )
            if start is not None:
                marks["restore"] = start
                unpause = _first(
                    h.t for h in dst.hypercalls if h.call == "domain_unpause" and start <= h.t <= m1
                )
                if unpause is not None:
                    marks["handover"] = unpause
    for step in ("verify", "destroy"):
        if step in spans:
            marks[step] = spans[step][0]
    return marks


def _first(times: Iterable[float]) -> float | None:
    return min(times, default=None)


def _toolstack(p: Principal) -> bool:
    return p is Principal.TOOLSTACK


def clock(marks: Mapping[str, float]) -> PhaseClock:
    return PhaseClock({phase: (t, t) for phase, t in marks.items()})


# ------------------------------------------------------------------------------------ cells


def outcome(m: MigrationCase) -> str:
    """``refused``: the domain was never created on the source; ``aborted``: the migration
    failed (the destination could not restore; the source runs on); ``corrupt``: it migrated
    but a view of the screen is not the last frame drawn; ``intact``: every view is."""
    if m.error is not None:
        return "refused" if "migrate" not in m.spans else "aborted"
    return "intact" if m.ok else "corrupt"


def failure_line(error: str | None) -> str | None:
    """The device model's last log line in an error message, if it has one."""
    found = _DM_LINE.findall(error or "")
    return found[-1] if found else None


def _path(path: str) -> str:
    return _DM_DOMID.sub("/device-model/$DOMID", path)


def _path_class(r: XenstoreRequest) -> str:
    for kind in (PathClass.PHYSMAP, PathClass.DM_STATE, PathClass.DEVICE_MODEL):
        if kind in r.path_classes:
            return kind.value
    kind = PathClass.GUEST_TREE if PathClass.GUEST_TREE in r.path_classes else PathClass.OTHER
    return kind.value


def _per_principal() -> dict[str, dict[str, int]]:
    return {host: {p.value: 0 for p in PRINCIPALS} for host in HOSTS}


def _planted_before_dm(requests: Sequence[PhysmapRequest], dst: HostLogs, t0: float) -> bool | None:
    writes = [
        r.t
        for r in requests
        if r.host == DESTINATION and r.principal == Principal.TOOLSTACK.value and r.op == "WRITE"
    ]
    if not writes:
        return None
    spawn = _first(a.t for a in dst.toolstack if a.action == "spawn" and a.t >= t0)
    dm_first = _first(
        r.t
        for r in requests
        if r.host == DESTINATION and r.principal == Principal.DEVICE_MODEL.value and r.t >= t0
    )
    last = max(writes)
    return spawn is not None and last < spawn and (dm_first is None or last < dm_first)


def build_cell(case: Case, m: MigrationCase, logs: Mapping[str, HostLogs]) -> MigrationCell:
    """The cell of one migration from the records of its time window on both hosts."""
    w0 = min((s[0] for s in m.spans.values()), default=0.0)
    w1 = max((s[1] for s in m.spans.values()), default=0.0)
    mine = {host: logs.get(host, HostLogs()).window(w0, w1) for host in HOSTS}
    marks = phase_marks(m.spans, mine[SOURCE], mine[DESTINATION], m.source_domid)
    phase_at = clock(marks).phase_at
    xs_ops, physmap, physmap_ok, calls = (_per_principal() for _ in range(4))
    access: Counter[tuple[str, str, str, str, str, bool]] = Counter()
    requests: list[PhysmapRequest] = []
    for host in HOSTS:
        for r in mine[host].xenstore:
            phase = phase_at(r.t) or "boot"
            if not r.is_request or r.principal not in PRINCIPALS or phase in NOT_COUNTED:
                continue
            who = r.principal.value
            xs_ops[host][who] += 1
            access[(host, who, phase, _path_class(r), r.op, r.ok)] += 1
            if r.touches(PathClass.PHYSMAP):
                physmap[host][who] += 1
                physmap_ok[host][who] += r.ok
                path = _path(r.paths[0]) if r.paths else ""
                requests.append(PhysmapRequest(r.t, host, who, phase, r.op, path, r.result))
        for h in mine[host].hypercalls:
            if h.principal in PRINCIPALS and phase_at(h.t) not in NOT_COUNTED:
                calls[host][h.principal.value] += 1
    requests.sort(key=lambda r: r.t)
    restore_t0 = marks.get("restore", w1 + 1)
    return MigrationCell(
        mode=case.mode,
        device=case.device,
        toolstack=case.toolstack,
        outcome=outcome(m),
        expected=expected_outcome(case),
        migrated=m.migrated,
        fb_hash_matches=m.fb_sha256_expected is not None
        and m.fb_sha256_guest == m.fb_sha256_dm == m.fb_sha256_expected,
        pointers_valid=m.derived_ptrs_valid,
        error=m.error,
        failure=failure_line(m.error),
        hosts={SOURCE: m.source_host, DESTINATION: m.destination_host},
        keys_carried=dict(m.physmap_keys.get(m.source_host, {})),
        keys_planted=dict(m.physmap_keys.get(m.destination_host, {})),
        planted_before_dm=_planted_before_dm(requests, mine[DESTINATION], restore_t0),
        precopy_rounds=m.precopy_rounds,
        pages_sent=m.pages_sent,
        downtime_s=m.downtime_s,
        total_s=m.total_s,
        xenstore_ops=xs_ops,
        physmap_ops=physmap,
        physmap_ops_ok=physmap_ok,
        hypercalls=calls,
        access=[HostAccess(*k, n) for k, n in sorted(access.items())],
        physmap_requests=requests,
        phases={p: round(t - w0, 4) for p, t in sorted(marks.items(), key=lambda kv: kv[1])},
    )


# ----------------------------------------------------------------- beside the restore cell


def restore_dm_requests(s: Scenario) -> list[str]:
    """The restored device model's physmap requests of a save/restore cell, as
    :attr:`PhysmapRequest.shown` puts them."""
    out = []
    for line in s.principals[Principal.DEVICE_MODEL.value].physmap_requests:
        phase, _, rest = line.partition(": ")
        if phase == "restore":
            out.append(_path(rest))
    return out


def match_restore(cell: MigrationCell, s: Scenario) -> RestoreMatch:
    """The migration cell beside the save/restore cell of the same case: the same outcome, the
    same last words of the device model, the same physmap requests by the device model that
    starts on the saved state (the destination's, the restored one's)."""
    mine = [
        r.shown
        for r in cell.physmap_requests
        if r.host == DESTINATION
        and r.principal == Principal.DEVICE_MODEL.value
        and r.phase == "restore"
    ]
    return RestoreMatch(
        restore_cell=s.label,
        same_outcome=cell.outcome == s.outcome,
        failure=cell.failure,
        restore_failure=failure_line(s.error),
        dm_requests=mine,
        restore_dm_requests=restore_dm_requests(s),
    )


def restore_twin(cell: MigrationCell, scenarios: Sequence[Scenario]) -> Scenario | None:
    """The save/restore cell of the same mode, device and toolstack, with a privileged device
    model (the one the migration runs)."""
    for s in scenarios:
        if (s.mode, s.device, s.toolstack, s.dm) == (
            cell.mode,
            cell.device,
            cell.toolstack,
            "privileged",
        ):
            return s
    return None


def needs_restore_twin(cell: MigrationCell) -> bool:
    """A cell the facts expect to fail is checked against its save/restore twin."""
    return cell.expected != "intact"


def migration_matrix(
    toolstacks: Sequence[str], modes: Sequence[str], devices: Sequence[str]
) -> list[Case]:
    """The migration cells: every mode x device with libxl, and compat mode with each other
    toolstack (which carries no keys); a privileged device model, as QEMU 2.10."""
    cases = []
    for toolstack in dict.fromkeys(toolstacks):
        for mode in dict.fromkeys(modes):
            if toolstack != "libxl" and mode != "compat":
                continue
            cases += [Case(mode, device, toolstack) for device in dict.fromkeys(devices)]
    return cases

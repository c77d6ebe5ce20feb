"""One cell of the matrix: its outcome and every principal's xenstore requests, by phase.

Pure: a case, what the demo saw, and the audit records of the case's time window in; a
:class:`Scenario` out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..auditlog import HypercallRecord, PathClass, Principal, ToolstackRecord, XenstoreRequest
from ..demo import Case, CaseResult, Observed
from .phases import PhaseClock
from .privilege import Permission, needed

PRINCIPALS: Final = (Principal.TOOLSTACK, Principal.DEVICE_MODEL, Principal.GUEST)
OUTCOMES: Final = ("intact", "corrupt", "aborted", "refused")
#: The rule xenstored records when only the connection's privilege allowed a request.
PRIVILEGED_RULE: Final = "privileged"
_SHOWN: Final = frozenset(
    {PathClass.PHYSMAP.value, PathClass.DM_STATE.value, PathClass.DEVICE_MODEL.value}
)


def expected_outcome(case: Case) -> str:
    """What the facts predict for a cell.

    From QEMU 3.0 a compat device model cannot be restricted: compat builds have no working
    ``xentoolcore_restrict_all`` and QEMU exits.  QEMU 2.10's ``xen_restrict`` takes the
    stubs' ENOTTY for success, so there it starts with xenstore open and behaves as an
    unrestricted one.  Compat mode with a toolstack that does not carry the physmap keys
    aborts on restore.  The pointer-fixup reconstruction leaves QXL's ``d->ram`` stale.  New
    mode works everywhere.
    """
    if case.mode == "compat" and case.restrict and case.qemu != "2.10":
        return "refused"
    if case.mode == "compat" and case.toolstack != "libxl":
        return "aborted"
    if case.mode == "pointer-fixup" and case.device == "qxl":
        return "corrupt"
    return "intact"


def outcome(seen: Observed, result: CaseResult) -> str:
    """``refused``: the device model would not start (create failed); ``aborted``: a later step
    failed, the device model died (the compat shim's assertion, docs/qemu-physmap.md, 'Restore,
    compat mode'); ``corrupt``: every step ran but a view of the framebuffer or a derived pointer is
    wrong (docs/qemu-physmap.md, 'Why not patch the pointers'); ``intact``: the restored guest shows
    what it drew."""
    if seen.error is not None:
        return "refused" if seen.failed_step == "create" else "aborted"
    return "intact" if result.ok else "corrupt"


@dataclass(slots=True)
class PrincipalStats:
    xenstore_ops: int = 0
    privileged_ops: int = 0
    denied_ops: int = 0
    physmap_ops: int = 0
    physmap_ops_ok: int = 0
    hypercalls: int = 0
    #: ``{phase: {op: n}}`` of xenstore requests.
    by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    #: ``{path_class: n}``.
    by_path_class: dict[str, int] = field(default_factory=dict)
    #: The physmap requests themselves, ``"OP path -> result"``.
    physmap_requests: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "xenstore_ops": self.xenstore_ops,
            "privileged_ops": self.privileged_ops,
            "denied_ops": self.denied_ops,
            "physmap_ops": self.physmap_ops,
            "physmap_ops_ok": self.physmap_ops_ok,
            "hypercalls": self.hypercalls,
            "by_phase": self.by_phase,
            "by_path_class": self.by_path_class,
            "physmap_requests": self.physmap_requests,
        }


@dataclass(frozen=True, slots=True)
class Access:
    """A group of the access audit: how many requests share these properties."""

    principal: str
    phase: str
    path_class: str
    op: str
    privileged: bool
    denied: bool
    n: int


@dataclass(slots=True)
class Scenario:
    mode: str
    device: str
    toolstack: str
    dm: str
    #: The QEMU the device model behaved as; restriction differs between 2.10 and 3.0.
    qemu: str
    outcome: str
    expected: str
    fb_hash_matches: bool
    pointers_valid: bool | None
    keys_carried: dict[str, str]
    principals: dict[str, PrincipalStats]
    access: list[Access]
    #: Xenstore requests of every principal during save and during restore.
    round_trips: dict[str, int]
    save_s: float | None
    restore_s: float | None
    error: str | None
    domids: list[int]
    #: The restore phase, in order: ``(t, who, to, what)`` for the sequence diagram.
    restore_events: list[tuple[float, str, str, str]]
    #: The least-privilege set per principal (:func:`.privilege.needed`).
    needed: dict[str, list[Permission]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        suffix = "" if self.qemu == "2.10" else f"@qemu-{self.qemu}"
        return f"{self.mode}/{self.device}/{self.toolstack}/{self.dm}{suffix}"

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "device": self.device,
            "toolstack": self.toolstack,
            "dm": self.dm,
            "qemu": self.qemu,
            "outcome": self.outcome,
            "expected": self.expected,
            "fb_hash_matches": self.fb_hash_matches,
            "pointers_valid": self.pointers_valid,
            "keys_carried": self.keys_carried,
            "principals": {k: v.as_json() for k, v in self.principals.items()},
            "denied_ops": sum(v.denied_ops for v in self.principals.values()),
            "access": [
                {
                    "principal": a.principal,
                    "phase": a.phase,
                    "path_class": a.path_class,
                    "op": a.op,
                    "privileged": a.privileged,
                    "denied": a.denied,
                    "n": a.n,
                }
                for a in self.access
            ],
            "round_trips": self.round_trips,
            "save_s": self.save_s,
            "restore_s": self.restore_s,
            "error": self.error,
            "domids": self.domids,
            "least_privilege": {
                who: [
                    {"perm": str(p), "dom0_owned": p.dom0_owned, "physmap": p.physmap}
                    for p in perms
                ]
                for who, perms in self.needed.items()
            },
        }


def _path_class(r: XenstoreRequest) -> str:
    # A request over several classes goes to the most specific one.
    for kind in (PathClass.PHYSMAP, PathClass.DM_STATE, PathClass.DEVICE_MODEL):
        if kind in r.path_classes:
            return kind.value
    return (
        PathClass.GUEST_TREE if PathClass.GUEST_TREE in r.path_classes else PathClass.OTHER
    ).value


_AccessKey = tuple[str, str, str, str, bool, bool]


@dataclass
class _Tally:
    """What the audit records of one case add up to, by principal and by phase."""

    clock: PhaseClock
    stats: dict[str, PrincipalStats] = field(
        default_factory=lambda: {p.value: PrincipalStats() for p in PRINCIPALS}
    )
    access: Counter[_AccessKey] = field(default_factory=Counter)
    trips: Counter[str] = field(default_factory=Counter)
    #: The restore phase as a sequence: (time, from, to, what).
    events: list[tuple[float, str, str, str]] = field(default_factory=list)

    def xenstore(self, r: XenstoreRequest) -> None:
        if not r.is_request or r.principal not in PRINCIPALS:
            return
        phase = self.clock.phase_at(r.t) or "boot"
        pc = _path_class(r)
        _count(self.stats[r.principal.value], r, phase, pc)
        key = (r.principal.value, phase, pc, r.op, r.rule == PRIVILEGED_RULE, r.denied)
        self.access[key] += 1
        if phase in ("save", "restore"):
            self.trips[phase] += 1
        if phase == "restore":
            # The domain's own tree is one block in the picture; the device-model keys are
            # what the experiment is about, so each of their ops shows.
            what = f"{r.op} {pc}" if pc in _SHOWN else "domain tree"
            what += "" if r.ok else f" → {r.result}"
            self.events.append((r.t, r.principal.value, "xenstored", what))

    def toolstack(self, a: ToolstackRecord) -> None:
        if self.clock.phase_at(a.t) != "restore":
            return
        if a.action == "spawn":
            self.events.append((a.t, "toolstack", "device-model", "spawn qemu-model"))
        elif a.action == "qmp":
            self.events.append((a.t, "toolstack", "device-model", f"QMP {a.call}"))

    def hypercall(self, h: HypercallRecord) -> None:
        if h.principal not in PRINCIPALS:
            return
        self.stats[h.principal.value].hypercalls += 1
        if self.clock.phase_at(h.t) == "restore" and h.call != "guest_op":
            what = h.call + ("" if h.result == "ok" else f" → {h.result}")
            self.events.append((h.t, h.principal.value, "hypervisor", what))


def _count(s: PrincipalStats, r: XenstoreRequest, phase: str, pc: str) -> None:
    """One xenstore request in its principal's counts."""
    s.xenstore_ops += 1
    s.privileged_ops += r.rule == PRIVILEGED_RULE
    s.denied_ops += r.denied
    s.by_path_class[pc] = s.by_path_class.get(pc, 0) + 1
    s.by_phase.setdefault(phase, {})
    s.by_phase[phase][r.op] = s.by_phase[phase].get(r.op, 0) + 1
    if r.touches(PathClass.PHYSMAP):
        s.physmap_ops += 1
        s.physmap_ops_ok += r.ok
        s.physmap_requests.append(f"{phase}: {r.op} {r.paths[0] if r.paths else ''} -> {r.result}")


def build(
    case: Case,
    seen: Observed,
    result: CaseResult,
    xenstore: Iterable[XenstoreRequest],
    hypercalls: Iterable[HypercallRecord] = (),
    toolstack: Iterable[ToolstackRecord] = (),
) -> Scenario:
    """The scenario of one case from the audit records of its time window."""
    tally = _Tally(PhaseClock(seen.spans))
    xenstore_list = list(xenstore)
    for r in xenstore_list:
        tally.xenstore(r)
    for a in toolstack:
        tally.toolstack(a)
    for h in hypercalls:
        tally.hypercall(h)
    tally.events.sort()
    xs = [r for r in xenstore_list if r.principal in PRINCIPALS]
    perms = {p.value: sorted(needed(r for r in xs if r.principal is p)) for p in PRINCIPALS}
    dm_restored = result.fb_sha256_restored
    return Scenario(
        mode=case.mode,
        device=case.device,
        toolstack=case.toolstack,
        dm="restricted" if case.restrict else "privileged",
        qemu=case.qemu,
        outcome=outcome(seen, result),
        expected=expected_outcome(case),
        fb_hash_matches=dm_restored == result.fb_sha256_expected
        and result.fb_sha256_guest_restored == result.fb_sha256_expected,
        pointers_valid=result.derived_ptrs_valid,
        keys_carried=dict(seen.xenstore_keys_saved),
        principals=tally.stats,
        access=[Access(*k, n) for k, n in sorted(tally.access.items())],
        round_trips={"save": tally.trips["save"], "restore": tally.trips["restore"]},
        save_s=_round(seen.steps.get("save")),
        restore_s=_round(seen.steps.get("restore")),
        error=result.error,
        domids=list(result.domids),
        restore_events=tally.events,
        needed=perms,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2

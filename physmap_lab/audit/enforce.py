"""Least privilege, enforced: re-run cells with the device model in a stub domain that holds
exactly the xenstore permissions the audit derived, and nothing else.

libxl runs a stub device model as its own unprivileged domain (qemu-physmap.md §5.5,
xenstore-facts.md §3.5): its xenstore requests arrive on the stub's guest socket and pass only
where a node's ACL names the stub.  ``xl-sim --dm-stubdom --dm-grant …`` builds that domain and
grants it the set given (:mod:`toolstack.dmperms`).  The variants:

* ``stubdom``: create and restore with a stub device model holding the derived set;
* ``stubdom-no-physmap-grant``: the same without the set's physmap permissions;
* ``restore-in-stubdom``: create and save with the device model in dom0, restore into a stub
  holding the derived set (the keys libxl carried land under ``/local/domain/0``, §2.3);
* ``restore-in-stubdom-no-physmap-grant``: that restore without the physmap permissions.

Pure: the derived sets and the audit records of a cell's time window in, findings out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..auditlog import PathClass, Principal, XenstoreRequest
from ..demo import Case, CaseResult, Observed
from .privilege import Permission, home_of, template
from .scenario import outcome

#: The devices the enforced re-run covers by default: a plain framebuffer and the one with
#: derived pointers (qemu-physmap.md §4.7).
ENFORCED_DEVICES: Final = ("stdvga", "qxl")
#: The modes whose derived set is enforced: the legacy path and its replacement.
ENFORCED_MODES: Final = ("compat", "new")

STUBDOM: Final = "stubdom"
STUBDOM_NO_PHYSMAP: Final = "stubdom-no-physmap-grant"
RESTORE_STUBDOM: Final = "restore-in-stubdom"
RESTORE_STUBDOM_NO_PHYSMAP: Final = "restore-in-stubdom-no-physmap-grant"
#: The variants per mode; new mode's set has no physmap permission to leave out.
VARIANTS: Final[dict[str, tuple[str, ...]]] = {
    "new": (STUBDOM,),
    "compat": (STUBDOM, STUBDOM_NO_PHYSMAP, RESTORE_STUBDOM, RESTORE_STUBDOM_NO_PHYSMAP),
}


@dataclass(frozen=True, slots=True)
class Variant:
    mode: str
    device: str
    kind: str
    #: The grants handed to the toolstack, as ``"ACCESS TEMPLATE"``.
    grants: tuple[str, ...]
    #: The derived permissions left out (the physmap ones, or none).
    withheld: tuple[str, ...]

    @property
    def create_in_stubdom(self) -> bool:
        return self.kind in (STUBDOM, STUBDOM_NO_PHYSMAP)

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.device}/{self.kind}"

    @property
    def case(self) -> Case:
        return Case(self.mode, self.device, "libxl")

    def grant_args(self) -> list[str]:
        """``xl-sim`` options that put the device model in a stub domain with these grants."""
        args = ["--dm-stubdom"]
        if not self.grants:
            return [*args, "--dm-no-grants"]
        for g in self.grants:
            args += ["--dm-grant", g]
        return args

    def xl_args(self, command: str) -> list[str]:
        """What to add to an ``xl-sim create`` or ``restore`` of this variant."""
        if command == "create":
            return self.grant_args() if self.create_in_stubdom else []
        if command == "restore":
            return self.grant_args()
        return []


def expected(kind: str, mode: str) -> str:
    """What the facts predict.  New mode needs nothing for the physmap (qemu-physmap.md §5.6).
    Compat mode needs its physmap permissions on the dom0-owned path it hard-codes (§1.1,
    §5.5); even with them, a device model that runs in a stub domain from the start loses the
    keys at save, because libxl reads them from the stub's own directory (§2.1) while the
    device model wrote them under ``/local/domain/0``."""
    if mode != "compat":
        return "intact"
    return "intact" if kind == RESTORE_STUBDOM else "aborted"


def acl_kind(perms: Iterable[Permission]) -> list[Permission]:
    """The reads and writes of a set (not the privileged-only ops no ACL can give)."""
    return sorted(p for p in perms if p.access in ("r", "w"))


def grantable(perms: Iterable[Permission]) -> list[Permission]:
    """The permissions a stub needs an ACL entry for: reads and writes outside its own tree
    (``~``), whose ``device-model/<domid>`` libxl makes owned by the stub (§5.5)."""
    return [p for p in acl_kind(perms) if not p.own_home]


def plan(
    derived: Mapping[str, Sequence[Permission]],
    devices: Sequence[str] = ENFORCED_DEVICES,
    modes: Sequence[str] = ENFORCED_MODES,
) -> list[Variant]:
    """The variants to run for the modes with a derived device-model set."""
    out: list[Variant] = []
    for mode in modes:
        if mode not in derived:
            continue
        perms = grantable(derived[mode])
        full = tuple(str(p) for p in perms)
        physmap = tuple(str(p) for p in perms if p.physmap)
        without = tuple(str(p) for p in perms if not p.physmap)
        for device in devices:
            for kind in VARIANTS.get(mode, ()):
                if kind in (STUBDOM_NO_PHYSMAP, RESTORE_STUBDOM_NO_PHYSMAP):
                    out.append(Variant(mode, device, kind, without, physmap))
                else:
                    out.append(Variant(mode, device, kind, full, ()))
    return out


def is_device_model(r: XenstoreRequest) -> bool:
    """A device model's request, on the privileged socket or on a stub's guest socket (where
    the audit log's principal is the guest socket's)."""
    return r.peer.program_principal is Principal.DEVICE_MODEL


@dataclass(slots=True)
class EnforcedCell:
    variant: Variant
    outcome: str
    expected: str
    fb_hash_matches: bool
    keys_carried: dict[str, str]
    dm_requests: int
    #: Device-model requests on the privileged socket (none when it runs in a stub domain).
    dm_privileged_requests: int
    #: The domains the device model's requests came from (the stub domains).
    dm_domids: list[int]
    #: Physmap requests that succeeded for the device model in its stub domain.
    dm_physmap_ok: int
    denied_ops: int
    #: ``"OP template -> RESULT": n`` of the denied requests.
    denied: dict[str, int]
    error: str | None
    domids: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        v = self.variant
        return {
            "mode": v.mode,
            "device": v.device,
            "variant": v.kind,
            "create_in_stubdom": v.create_in_stubdom,
            "restore_in_stubdom": True,
            "grants": list(v.grants),
            "withheld": list(v.withheld),
            "outcome": self.outcome,
            "expected": self.expected,
            "fb_hash_matches": self.fb_hash_matches,
            "keys_carried": self.keys_carried,
            "dm_requests": self.dm_requests,
            "dm_privileged_requests": self.dm_privileged_requests,
            "dm_domids": self.dm_domids,
            "dm_physmap_ok": self.dm_physmap_ok,
            "denied_ops": self.denied_ops,
            "denied": self.denied,
            "error": self.error,
            "domids": self.domids,
        }


def judge(
    variant: Variant, seen: Observed, result: CaseResult, xenstore: Iterable[XenstoreRequest]
) -> EnforcedCell:
    """One enforced cell from what the demo saw and the xenstore records of its window."""
    dm = [r for r in xenstore if r.is_request and is_device_model(r)]
    denied: Counter[str] = Counter()
    for r in dm:
        if r.denied:
            where = template(r.paths[0], home_of(r)) if r.paths else ""
            denied[f"{r.op} {where} -> {r.result}"] += 1
    return EnforcedCell(
        variant=variant,
        outcome=outcome(seen, result),
        expected=expected(variant.kind, variant.mode),
        fb_hash_matches=result.ok,
        keys_carried=dict(seen.xenstore_keys_saved),
        dm_requests=len(dm),
        dm_privileged_requests=sum(r.priv for r in dm),
        dm_domids=sorted({r.domid for r in dm}),
        dm_physmap_ok=sum(1 for r in dm if not r.priv and r.ok and r.touches(PathClass.PHYSMAP)),
        denied_ops=sum(denied.values()),
        denied=dict(sorted(denied.items())),
        error=result.error,
        domids=list(result.domids),
    )


def conclusions(
    derived: Mapping[str, Sequence[Permission]], cells: Sequence[EnforcedCell]
) -> dict[str, bool | None]:
    """The claims of the experiment, each ``None`` when the cells to decide it were not run."""

    def of(mode: str, kind: str) -> list[EnforcedCell]:
        return [c for c in cells if c.variant.mode == mode and c.variant.kind == kind]

    def all_or_none(found: list[EnforcedCell], ok: bool) -> bool | None:
        return None if not found else ok

    new = of("new", STUBDOM)
    new_set = derived.get("new")
    compat_set = derived.get("compat")
    granted = of("compat", RESTORE_STUBDOM)
    refused = of("compat", RESTORE_STUBDOM_NO_PHYSMAP) + of("compat", STUBDOM_NO_PHYSMAP)
    full = of("compat", STUBDOM)
    return {
        "new_set_has_nothing_for_the_physmap": None
        if new_set is None
        else not any(p.physmap for p in new_set),
        "new_set_has_nothing_under_dom0s_tree": None
        if new_set is None
        else not any(p.dom0_owned for p in new_set),
        "new_passes_in_a_stub_with_exactly_its_set": all_or_none(
            new,
            all(
                c.outcome == "intact" and c.denied_ops == 0 and c.dm_privileged_requests == 0
                for c in new
            ),
        ),
        "compat_set_writes_under_a_dom0_owned_physmap_path": None
        if compat_set is None
        else any(p.physmap and p.dom0_owned and p.access == "w" for p in compat_set),
        "compat_restore_passes_with_the_physmap_grant": all_or_none(
            granted, all(c.outcome == "intact" and c.denied_ops == 0 for c in granted)
        ),
        "compat_without_the_physmap_grant_is_denied_and_fails": all_or_none(
            refused, all(c.outcome != "intact" and c.denied_ops > 0 for c in refused)
        ),
        "compat_in_a_stub_from_creation_loses_the_keys_at_save": all_or_none(
            full, all(c.outcome != "intact" and not c.keys_carried for c in full)
        ),
    }


def as_json(
    derived: Mapping[str, Sequence[Permission]], cells: Sequence[EnforcedCell]
) -> dict[str, Any]:
    """The ``least_privilege_enforced`` section of the audit's JSON: per mode the derived
    reads and writes (``~`` is the device model's own tree) and the part of them granted."""
    return {
        "derived": {mode: [str(p) for p in acl_kind(perms)] for mode, perms in derived.items()},
        "granted": {mode: [str(p) for p in grantable(perms)] for mode, perms in derived.items()},
        "cells": [c.as_json() for c in cells],
        "conclusions": conclusions(derived, cells),
    }

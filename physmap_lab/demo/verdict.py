"""The demo's verdict: what each case saw, judged against the pattern the guest drew and against
the physmap requests the xenstore audit log recorded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xenhost import RunDir

from ..auditlog import AuditFormatError, read_xenstored
from .plan import Case, expected_to_work, pattern_sha256


@dataclass(slots=True)
class Observed:
    """What one case saw, step by step (``None`` where a step did not get that far)."""

    domid_saved: int | None = None
    domid_restored: int | None = None
    fb_sha256_guest_saved: str | None = None
    fb_sha256_dm_saved: str | None = None
    fb_sha256_dm_restored: str | None = None
    fb_sha256_guest_restored: str | None = None
    dm_mode: str | None = None
    dm_restricted: bool | None = None
    vram_ptr_saved: int | None = None
    vram_ptr_at_init: int | None = None
    vram_ptr_after_load: int | None = None
    derived_ptrs_valid: bool | None = None
    image_records: list[str] = field(default_factory=list)
    image_bytes: int | None = None
    xenstore_keys_saved: dict[str, str] = field(default_factory=dict)
    dm_physmap_ops: dict[str, int] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    #: Wall-clock (``time.time``) start and end of each step, to cut the audit logs by step.
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The step that raised, if one did.
    failed_step: str | None = None
    error: str | None = None


@dataclass(slots=True)
class CaseResult:
    """One object of ``{"runs": [...]}``."""

    mode: str
    device: str
    toolstack: str
    dm: str | None
    #: The QEMU the device model behaved as.
    qemu_version: str
    ok: bool
    expected_ok: bool
    error: str | None
    fb_sha256_expected: str
    fb_sha256_saved: str | None
    fb_sha256_restored: str | None
    fb_sha256_dm_saved: str | None
    fb_sha256_guest_restored: str | None
    vram_ptr_at_init: int | None
    vram_ptr_after_load: int | None
    vram_ptr_saved: int | None
    derived_ptrs_valid: bool | None
    image_records: list[str]
    image_bytes: int | None
    xenstore_keys_saved: dict[str, str]
    physmap_xenstore_ops: dict[str, int] | None
    physmap_xenstore_ops_ok: dict[str, int] | None
    dm_physmap_ops: dict[str, int]
    domids: list[int]
    seconds: float
    steps: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    case: Case,
    seen: Observed,
    physmap_ops: tuple[dict[str, int], dict[str, int]] | None,
    seconds: float,
) -> CaseResult:
    """Judge a case: it is ok when every view of the framebuffer shows the pattern the guest
    drew (the guest before save and after restore, the device model before save and after
    restore) and QXL's derived pointers still point into the VRAM."""
    expected = pattern_sha256(case.device, case.seed)
    error = seen.error
    if error is None:
        views = {
            "the guest before save": seen.fb_sha256_guest_saved,
            "the device model before save": seen.fb_sha256_dm_saved,
            "the device model after restore": seen.fb_sha256_dm_restored,
            "the guest after restore": seen.fb_sha256_guest_restored,
        }
        wrong = [f"{who} sees {short_digest(h)}" for who, h in views.items() if h != expected]
        if wrong:
            error = (
                f"framebuffer is not the pattern drawn ({short_digest(expected)}): "
                + "; ".join(wrong)
            )
        elif seen.derived_ptrs_valid is False:
            error = "the device's derived pointers no longer point into the VRAM"
    dm = seen.dm_mode
    if dm is not None and seen.dm_restricted:
        dm += "+restrict"
    return CaseResult(
        mode=case.mode,
        device=case.device,
        toolstack=case.toolstack,
        dm=dm,
        qemu_version=case.qemu,
        ok=error is None,
        expected_ok=expected_to_work(case),
        error=error,
        fb_sha256_expected=expected,
        fb_sha256_saved=seen.fb_sha256_guest_saved,
        fb_sha256_restored=seen.fb_sha256_dm_restored,
        fb_sha256_dm_saved=seen.fb_sha256_dm_saved,
        fb_sha256_guest_restored=seen.fb_sha256_guest_restored,
        vram_ptr_at_init=seen.vram_ptr_at_init,
        vram_ptr_after_load=seen.vram_ptr_after_load,
        vram_ptr_saved=seen.vram_ptr_saved,
        derived_ptrs_valid=seen.derived_ptrs_valid,
        image_records=list(seen.image_records),
        image_bytes=seen.image_bytes,
        xenstore_keys_saved=dict(seen.xenstore_keys_saved),
        physmap_xenstore_ops=None if physmap_ops is None else physmap_ops[0],
        physmap_xenstore_ops_ok=None if physmap_ops is None else physmap_ops[1],
        dm_physmap_ops=dict(seen.dm_physmap_ops),
        domids=[d for d in (seen.domid_saved, seen.domid_restored) if d is not None],
        seconds=round(seconds, 3),
        steps={k: round(v, 3) for k, v in seen.steps.items()},
    )


def short_digest(digest: str | None) -> str:
    return "no picture" if digest is None else digest[:12]


def failed_unexpectedly(results: Iterable[CaseResult]) -> list[CaseResult]:
    """The cases that should have worked and did not: these make the demo exit non-zero."""
    return [r for r in results if r.expected_ok and not r.ok]


def worked_unexpectedly(results: Iterable[CaseResult]) -> list[CaseResult]:
    """The cases the facts say must break and that restored intact: the model is wrong, and
    these make the demo exit non-zero too."""
    return [r for r in results if r.ok and not r.expected_ok]


def judge(
    root: Path, observed: Sequence[tuple[Case, Observed]], problems: list[str]
) -> list[CaseResult]:
    """Evaluate each case, counting its physmap requests in the xenstore audit log."""
    audit = RunDir(root).audit_log("xenstored")
    log = None
    if audit.exists():
        try:
            log = read_xenstored(audit)
        except AuditFormatError as exc:
            problems.append(f"cannot read the xenstore audit log: {exc}")
    else:
        problems.append(f"no xenstore audit log at {audit}")
    results = []
    for case, seen in observed:
        domids = [d for d in (seen.domid_saved, seen.domid_restored) if d is not None]
        ops = None
        if log is not None:
            ops = (log.physmap_ops(about=domids), log.physmap_ops(about=domids, ok=True))
        results.append(evaluate(case, seen, ops, seen.steps.get("total", 0.0)))
    return results

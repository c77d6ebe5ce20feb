"""The demo's results table: compact enough for 100 columns, or ``--wide`` with every value.

The compact form keeps every column, the ``derived ptrs ok`` one included (it is what explains
pointer-fixup on QXL), and shortens values instead: the case in one cell that may wrap, 8-hex
framebuffer digests with "same" when the restore kept them, "same"/"moved" for the VRAM pointer.
``--wide`` shows the full digests and pointer values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from rich import box
from rich.table import Table

from .demo import CaseResult

#: Short names of the libxl stream records for the table (image_records keeps the full ones).
RECORD_ABBREV: Final = {
    "LIBXC_CONTEXT": "LIBXC",
    "EMULATOR_XENSTORE_DATA": "XS_DATA",
    "EMULATOR_CONTEXT": "EMU",
    "END": "END",
}

TITLE: Final = "physmap-lab demo: save → destroy → restore"
_LEGEND_COMMON: Final = (
    "derived ptrs ok: whether the pointers a card derives from its VRAM pointer (QXL's RAM "
    "header and rings) still point into the VRAM after restore; pointer-fixup moves the VRAM "
    "pointer but leaves them stale, so QXL fails there. "
    "Records: LIBXC = LIBXC_CONTEXT, XS_DATA = EMULATOR_XENSTORE_DATA, EMU = EMULATOR_CONTEXT. "
    "Physmap ops: xenstore requests on /local/domain/0/device-model/<domid>/physmap by the "
    "toolstack · the device model · the guest; '(n ok)' when some failed."
)


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def ops_cell(ops: dict[str, int] | None, ok: dict[str, int] | None) -> str:
    """``7 · 8 · 0`` for the toolstack, the device model and the guest; a count that includes
    failed requests says how many succeeded."""
    if ops is None:
        return "-"
    parts = []
    for who, n in ops.items():
        good = n if ok is None else ok.get(who, 0)
        text = f"{n} ({good} ok)" if good != n else str(n)
        parts.append(text if who in ("toolstack", "device-model", "guest") else f"{who} {text}")
    return " · ".join(parts)


def _ptrs(at_init: int | None, after_load: int | None) -> str:
    if at_init is not None and at_init == after_load:
        return f"{at_init:#x} (same)"
    return f"{_hex(at_init)} → {_hex(after_load)}"


def _ptr_moved(at_init: int | None, after_load: int | None) -> str:
    if at_init is None or after_load is None:
        return "-"
    return "same" if at_init == after_load else "[yellow]moved[/yellow]"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else "[green]yes[/green]" if ok else "[red]no[/red]"


def _verdict(r: CaseResult) -> str:
    if r.ok:
        return "[green]ok[/green]"
    if r.expected_ok:
        return "[bold red]FAIL[/bold red]"
    return "[yellow]fails (expected)[/yellow]"


def _records(r: CaseResult) -> str:
    return " ".join(RECORD_ABBREV.get(x, x) for x in r.image_records) or "-"


def _fb(saved: str | None, restored: str | None) -> str:
    if saved is None:
        return "-"
    if restored == saved:
        return f"{saved[:8]} → same"
    return f"{saved[:8]} → [red]{(restored or '-')[:8]}[/red]"


def results_table(results: Sequence[CaseResult], *, wide: bool = False) -> Table:
    """The table ``physmap-lab demo`` prints: compact (fits 100 columns) or ``wide``."""
    return _wide(results) if wide else _compact(results)


def _compact(results: Sequence[CaseResult]) -> Table:
    # The case names the toolstack when it is not libxl, and the mode the device model chose
    # when it differs from the one asked for (auto).
    table = Table(
        title=TITLE,
        caption="fb: sha256 (8 hex) of the framebuffer the guest drew, before save → what the "
        "device model displays after restore. vram_ptr: whether the device model's VRAM pointer "
        "moved when the device state loaded. " + _LEGEND_COMMON + " --wide: full values.",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("case", min_width=9, max_width=13)
    table.add_column("result", min_width=6, max_width=10)
    table.add_column("fb saved →\nrestored", min_width=10, max_width=19)
    table.add_column("vram\nptr", no_wrap=True)
    table.add_column("derived\nptrs ok", no_wrap=True, min_width=7)
    table.add_column("image\nrecords", min_width=7, max_width=14)
    table.add_column("physmap ops\ntool · dm · guest", min_width=9, max_width=17)
    for r in results:
        case = " ".join(
            [r.mode, r.device]
            + ([r.toolstack] if r.toolstack != "libxl" else [])
            + ([f"→ {r.dm}"] if r.dm and r.dm != r.mode else [])
        )
        table.add_row(
            case,
            _verdict(r),
            _fb(r.fb_sha256_saved, r.fb_sha256_restored),
            _ptr_moved(r.vram_ptr_at_init, r.vram_ptr_after_load),
            _mark(r.derived_ptrs_valid),
            _records(r),
            ops_cell(r.physmap_xenstore_ops, r.physmap_xenstore_ops_ok),
        )
    return table


def _wide(results: Sequence[CaseResult]) -> Table:
    table = Table(
        title=TITLE,
        caption="fb saved: sha256 of the framebuffer the guest drew, before save. "
        "fb restored: what the device model displays after restore (the guest's own read-back "
        "must agree). vram_ptr: the device model's VRAM pointer at init and after the device "
        "state loaded. " + _LEGEND_COMMON,
        caption_justify="left",
    )
    for header in ("mode", "device", "toolstack", "dm", "ok"):
        table.add_column(header, no_wrap=True)
    table.add_column("fb saved", no_wrap=True)
    table.add_column("fb restored", no_wrap=True)
    table.add_column("vram_ptr\nat init → after load", no_wrap=True)
    table.add_column("derived\nptrs ok", min_width=7)
    table.add_column("image records", no_wrap=True)
    table.add_column("physmap ops\ntool · dm · guest", no_wrap=True)
    for r in results:
        table.add_row(
            r.mode,
            r.device,
            r.toolstack,
            r.dm or "-",
            _verdict(r),
            (r.fb_sha256_saved or "-")[:12],
            (r.fb_sha256_restored or "-")[:12],
            _ptrs(r.vram_ptr_at_init, r.vram_ptr_after_load),
            _mark(r.derived_ptrs_valid),
            _records(r),
            ops_cell(r.physmap_xenstore_ops, r.physmap_xenstore_ops_ok),
        )
    return table

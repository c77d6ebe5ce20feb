"""Hand-written SVG pictures of an audit: the matrix, xenstore ops per principal, restore
sequences.  Plain strings, no dependency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

from .scenario import PRINCIPALS, Scenario

COLOURS: Final = {
    "intact": "#2e7d32",
    "corrupt": "#f9a825",
    "aborted": "#c62828",
    "refused": "#6a1b9a",
}
PRINCIPAL_COLOURS: Final = {"toolstack": "#1565c0", "device-model": "#ef6c00", "guest": "#2e7d32"}
FONT: Final = 'font-family="DejaVu Sans, Arial, sans-serif"'


def _svg(width: int, height: int, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {FONT} font-size="12">'
    )
    return "\n".join(
        [head, f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>\n"]
    )


def _text(x: float, y: float, s: str, **attrs: str) -> str:
    extra = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" {extra}>{escape(s)}</text>'


def matrix_svg(scenarios: Sequence[Scenario]) -> str:
    """Rows: toolstack x dm (with the QEMU version); columns: mode x device; each cell
    coloured by its outcome."""
    rows = list(dict.fromkeys((s.toolstack, f"{s.dm} (QEMU {s.qemu})") for s in scenarios))
    cols = list(dict.fromkeys((s.mode, s.device) for s in scenarios))
    cell = {(s.toolstack, f"{s.dm} (QEMU {s.qemu})", s.mode, s.device): s for s in scenarios}
    left, top, cw, ch = 250, 70, 78, 46
    width, height = left + cw * len(cols) + 20, top + ch * len(rows) + 60
    body = [_text(10, 22, "Save → restore outcome per cell", font_size="16", font_weight="bold")]
    modes = list(dict.fromkeys(m for m, _ in cols))
    for m in modes:
        idx = [i for i, c in enumerate(cols) if c[0] == m]
        x = left + cw * (idx[0] + len(idx) / 2)
        body.append(_text(x, top - 30, m, text_anchor="middle", font_weight="bold"))
    for i, (_m, d) in enumerate(cols):
        body.append(_text(left + cw * (i + 0.5), top - 10, d, text_anchor="middle"))
    for j, (ts, dm) in enumerate(rows):
        body.append(_text(10, top + ch * (j + 0.6), f"{ts} / {dm}"))
        for i, (m, d) in enumerate(cols):
            s = cell.get((ts, dm, m, d))
            x, y = left + cw * i, top + ch * j
            colour = COLOURS.get(s.outcome, "#999") if s else "#eee"
            body.append(
                f'<rect x="{x + 2}" y="{y + 2}" width="{cw - 4}" height="{ch - 4}" '
                f'fill="{colour}" rx="4"/>'
            )
            if s is not None:
                body.append(
                    _text(x + cw / 2, y + ch / 2 + 4, s.outcome, text_anchor="middle", fill="white")
                )
    y = top + ch * len(rows) + 30
    for k, (name, colour) in enumerate(COLOURS.items()):
        x = left + k * 110
        body.append(f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="{colour}"/>')
        body.append(_text(x + 20, y, name))
    return _svg(width, height, body)


def chart_cells(scenarios: Sequence[Scenario], mode: str) -> list[Scenario]:
    """The cells a chart's bars for ``mode`` stand for: libxl with a privileged device model,
    where every mode gets the whole way through."""
    return [
        s for s in scenarios if s.mode == mode and s.toolstack == "libxl" and s.dm == "privileged"
    ]


def _bar(cells: Sequence[Scenario], who: str, physmap: bool) -> tuple[int, int, list[str]]:
    """The median cell's requests of ``who``: all, successful, and the errors of the others."""
    if not cells:
        return 0, 0, []
    key = (
        (lambda s: s.principals[who].physmap_ops)
        if physmap
        else (lambda s: s.principals[who].xenstore_ops)
    )
    cell = sorted(cells, key=key)[len(cells) // 2]
    st = cell.principals[who]
    if not physmap:
        return st.xenstore_ops, st.xenstore_ops - st.denied_ops, []
    errors = [r.rsplit(" -> ", 1)[-1] for r in st.physmap_requests]
    return st.physmap_ops, st.physmap_ops_ok, sorted({e for e in errors if e != "OK"})


_FAILED_PATTERN: Final = (
    '<defs><pattern id="failed" width="6" height="6" patternUnits="userSpaceOnUse" '
    'patternTransform="rotate(45)"><rect width="6" height="6" fill="white"/>'
    '<line x1="0" y1="0" x2="0" y2="6" stroke="#c62828" stroke-width="3"/></pattern></defs>'
)


@dataclass(frozen=True)
class _Plot:
    """The bar chart's geometry: its left edge, plot area and bars, and the tallest bar."""

    peak: int
    left: int = 60
    top: int = 80
    height: int = 240
    group_w: int = 180
    bar_w: int = 44

    @property
    def base(self) -> int:
        """The y of the axis, where every bar stands."""
        return self.top + self.height


def ops_chart_svg(scenarios: Sequence[Scenario], *, physmap: bool = False) -> str:
    """Xenstore (or physmap) requests per principal per mode: the median cell among
    :func:`chart_cells`.  The part of a bar that failed is hatched and its errors named."""
    modes = list(dict.fromkeys(s.mode for s in scenarios))
    data = {
        m: {p.value: _bar(chart_cells(scenarios, m), p.value, physmap) for p in PRINCIPALS}
        for m in modes
    }
    plot = _Plot(peak=max([v[0] for d in data.values() for v in d.values()] + [1]))
    width, height = max(plot.left + plot.group_w * len(modes) + 40, 720), plot.base + 120
    what = "physmap requests" if physmap else "xenstore requests"
    body = [
        _text(
            10,
            22,
            f"{what} per principal, per save/restore cycle",
            font_size="16",
            font_weight="bold",
        ),
        _FAILED_PATTERN,
        f'<line x1="{plot.left}" y1="{plot.base}" x2="{width - 20}" y2="{plot.base}" stroke="#333"/>',
    ]
    for gi, m in enumerate(modes):
        gx = plot.left + 20 + gi * plot.group_w
        for bi, p in enumerate(PRINCIPALS):
            x = gx + bi * (plot.bar_w + 4)
            body += _chart_bar(plot, x, PRINCIPAL_COLOURS[p.value], *data[m][p.value])
        body += _chart_group_label(plot, gx, m, len(chart_cells(scenarios, m)))
    body += _chart_legend(plot.left, plot.base + 60)
    return _svg(width, height, body)


def _chart_bar(plot: _Plot, x: int, fill: str, total: int, ok: int, errors: list[str]) -> list[str]:
    """One principal's bar: the requests that succeeded, the failed part hatched on top, the
    count and the errors above it."""
    base, bar_w = plot.base, plot.bar_w
    h_ok, h_all = plot.height * ok / plot.peak, plot.height * total / plot.peak
    out = [
        f'<rect x="{x}" y="{base - h_ok:.1f}" width="{bar_w}" height="{h_ok:.1f}" fill="{fill}"/>'
    ]
    if total > ok:
        out.append(
            f'<rect x="{x}" y="{base - h_all:.1f}" width="{bar_w}" '
            f'height="{h_all - h_ok:.1f}" fill="url(#failed)" stroke="#c62828"/>'
        )
    label = f"{total}" if total == ok else f"{total} ({ok} ok)"
    colour = "#333" if total == ok else "#c62828"
    mid = x + bar_w / 2
    out.append(
        _text(mid, base - h_all - 4, label, text_anchor="middle", fill=colour, font_size="11")
    )
    if errors:
        out.append(
            _text(
                mid,
                base - h_all - 17,
                " ".join(errors),
                text_anchor="middle",
                fill=colour,
                font_size="10",
            )
        )
    return out


def _chart_group_label(plot: _Plot, gx: int, mode: str, cells: int) -> list[str]:
    """The mode under its group of bars, and how many cells the median is of."""
    x = gx + 1.5 * plot.bar_w
    return [
        _text(x, plot.base + 20, mode, text_anchor="middle", font_weight="bold"),
        _text(x, plot.base + 34, f"median of {cells} cells", text_anchor="middle", font_size="10"),
    ]


def _chart_legend(left: int, y: int) -> list[str]:
    """The principals' colours, the hatching of failures, and what a bar is."""
    out: list[str] = []
    for k, p in enumerate(PRINCIPALS):
        x = left + k * 130
        out.append(
            f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="{PRINCIPAL_COLOURS[p.value]}"/>'
        )
        out.append(_text(x + 20, y, p.value))
    x = left + len(PRINCIPALS) * 130
    out.append(
        f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="url(#failed)" stroke="#c62828"/>'
    )
    out.append(_text(x + 20, y, "failed (error named above the bar)"))
    for k, line in enumerate(
        (
            "Each bar: the median, over one mode's libxl cells with a privileged device model",
            "(one cell per device), of one principal's requests in a create → save → restore cycle.",
        )
    ):
        out.append(_text(10, y + 28 + 15 * k, line, font_size="11"))
    return out


LANES: Final = ("toolstack", "xenstored", "hypervisor", "device-model", "guest")


def _collapse(events: Sequence[tuple[float, str, str, str]]) -> list[tuple[str, str, str, int]]:
    out: list[tuple[str, str, str, int]] = []
    for _t, who, to, what in events:
        if out and out[-1][:3] == (who, to, what):
            out[-1] = (who, to, what, out[-1][3] + 1)
        else:
            out.append((who, to, what, 1))
    return out


def sequence_svg(scenario: Scenario, *, limit: int = 60) -> str:
    """Who talks to whom during restore, in order (repeats of one message folded into xn)."""
    msgs = _collapse(scenario.restore_events)
    shown = msgs[:limit]
    lane_w, top, step = 170, 70, 20
    width = lane_w * len(LANES) + 20
    height = top + step * (len(shown) + 2) + 50
    x_of = {lane: 10 + lane_w * (i + 0.5) for i, lane in enumerate(LANES)}
    title = f"Restore, {scenario.mode} mode ({scenario.device}, {scenario.toolstack}, {scenario.dm} DM): {scenario.outcome}"
    body = [_text(10, 22, title, font_size="15", font_weight="bold")]
    for lane, x in x_of.items():
        body.append(_text(x, top - 18, lane, text_anchor="middle", font_weight="bold"))
        body.append(
            f'<line x1="{x}" y1="{top - 10}" x2="{x}" y2="{height - 20}" stroke="#bbb" stroke-dasharray="4 3"/>'
        )
    body.append(
        '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>'
    )
    for k, (who, to, what, n) in enumerate(shown):
        y = top + step * (k + 1)
        x1, x2 = x_of[who], x_of[to]
        colour = PRINCIPAL_COLOURS.get(who, "#333")
        if "→" in what:
            colour = "#c62828"
        body.append(
            f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="{colour}" marker-end="url(#a)"/>'
        )
        label = what + (f" x{n}" if n > 1 else "")
        body.append(
            _text((x1 + x2) / 2, y - 4, label, text_anchor="middle", font_size="10", fill=colour)
        )
    if len(msgs) > limit:
        body.append(_text(10, height - 28, f"… {len(msgs) - limit} more messages", font_size="10"))
    body.append(
        _text(
            10,
            height - 10,
            _verdict(scenario),
            font_size="12",
            font_weight="bold",
            fill=COLOURS.get(scenario.outcome, "#333"),
        )
    )
    return _svg(width, height, body)


def _verdict(s: Scenario) -> str:
    """What the guest's screen came to after this restore."""
    fb = {True: "the framebuffer is the one drawn", False: "the framebuffer is NOT the one drawn"}
    ptrs = {
        True: "derived pointers valid",
        False: "derived pointers stale: they still point into the old VRAM mapping",
    }
    parts = [f"after restore: {s.outcome}"]
    if s.fb_hash_matches is not None:
        parts.append(fb[s.fb_hash_matches])
    if s.pointers_valid is not None:
        parts.append(ptrs[s.pointers_valid])
    return "; ".join(parts)

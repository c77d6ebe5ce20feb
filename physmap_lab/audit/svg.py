"""Hand-written SVG pictures of an audit: the matrix, xenstore ops per principal, restore
sequences.  Plain strings, no dependency."""

from __future__ import annotations

from collections.abc import Sequence
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


def ops_chart_svg(scenarios: Sequence[Scenario], *, physmap: bool = False) -> str:
    """Xenstore requests per principal per mode (the median over the libxl cells with a
    privileged device model, where every mode gets the whole way through)."""
    modes = list(dict.fromkeys(s.mode for s in scenarios))
    data: dict[str, dict[str, float]] = {}
    for m in modes:
        cells = [
            s for s in scenarios if s.mode == m and s.toolstack == "libxl" and s.dm == "privileged"
        ]
        data[m] = {}
        for p in PRINCIPALS:
            vals = sorted(
                (
                    s.principals[p.value].physmap_ops
                    if physmap
                    else s.principals[p.value].xenstore_ops
                )
                for s in cells
            )
            data[m][p.value] = vals[len(vals) // 2] if vals else 0
    peak = max([v for d in data.values() for v in d.values()] + [1])
    left, top, plot_h, group_w, bar_w = 60, 50, 240, 180, 44
    width, height = left + group_w * len(modes) + 40, top + plot_h + 80
    what = "physmap requests" if physmap else "xenstore requests"
    body = [
        _text(
            10,
            22,
            f"{what} per principal, per save/restore cycle",
            font_size="16",
            font_weight="bold",
        )
    ]
    body.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" stroke="#333"/>'
    )
    for gi, m in enumerate(modes):
        gx = left + 20 + gi * group_w
        for bi, p in enumerate(PRINCIPALS):
            v = data[m][p.value]
            h = plot_h * v / peak
            x = gx + bi * (bar_w + 4)
            body.append(
                f'<rect x="{x}" y="{top + plot_h - h:.1f}" width="{bar_w}" height="{h:.1f}" '
                f'fill="{PRINCIPAL_COLOURS[p.value]}"/>'
            )
            body.append(_text(x + bar_w / 2, top + plot_h - h - 4, f"{v:g}", text_anchor="middle"))
        body.append(
            _text(gx + 1.5 * bar_w, top + plot_h + 20, m, text_anchor="middle", font_weight="bold")
        )
    y = top + plot_h + 50
    for k, p in enumerate(PRINCIPALS):
        x = left + k * 140
        body.append(
            f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="{PRINCIPAL_COLOURS[p.value]}"/>'
        )
        body.append(_text(x + 20, y, p.value))
    return _svg(width, height, body)


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
    height = top + step * (len(shown) + 2) + 30
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
        body.append(_text(10, height - 8, f"… {len(msgs) - limit} more messages", font_size="10"))
    return _svg(width, height, body)

"""The hostile audit's table, picture and report section.

Pure: the configurations' runs in, Markdown, a rich table and an SVG out.  A cell is red when
the attack succeeded and the victim's side shows it, amber when the request was allowed but
changed nothing a victim sees, green when it was refused; a cell the predictor did not expect
is outlined.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Final

from rich.table import Table

from ..svg import FONT
from .configs import HostileConfig
from .outcome import AttackCell, ConfigRun
from .predict import Principal

HARM: Final = "#c62828"
ALLOWED: Final = "#f9a825"
REFUSED: Final = "#2e7d32"


def verdict(c: AttackCell) -> str:
    if c.result != "succeeded":
        return f"refused ({c.errno})"
    return "succeeded" if c.effect else "allowed, no effect"


def colour(c: AttackCell) -> str:
    return REFUSED if c.result != "succeeded" else HARM if c.effect else ALLOWED


def attacks(runs: Sequence[ConfigRun]) -> list[tuple[str, str]]:
    """(attack, label) in catalogue order."""
    return list(dict.fromkeys((c.attack, c.label) for r in runs for c in r.cells))


def _cell(r: ConfigRun, attack: str) -> AttackCell | None:
    return next((c for c in r.cells if c.attack == attack), None)


def describe(cfg: HostileConfig, p: Principal | None) -> str:
    if p is None:
        return "not run"
    xs = {
        "dom0": "privileged dom0 xenstore socket",
        "domain": f"stub domain d{p.domid}'s guest socket (target d{p.target})",
        "none": "no xenstore (closed by xen_restrict)",
    }[p.xenstore]
    hv = "any domain" if p.hypervisor_to is None else f"only d{p.hypervisor_to}"
    return f"{xs}; privcmd: {hv}"


def short(p: Principal | None) -> str:
    """The credentials in a column header: xenstore identity · privcmd reach."""
    if p is None:
        return ""
    xs = {"dom0": "xs dom0", "domain": "xs stub", "none": "no xs"}[p.xenstore]
    return f"{xs} · hv {'any' if p.hypervisor_to is None else 'own'}"


def markdown(runs: Sequence[ConfigRun], command: str) -> list[str]:
    names = [r.config.name for r in runs]
    lines = [
        "## A compromised device model, per configuration",
        "",
        f"Produced by `{command}`: `qemu-model --hostile` ran the catalogue below with the "
        "credentials of each configuration's device model, against two victim guests (V1, V2) "
        "on the same host; A is the attacker's own guest.  *succeeded*: the request was "
        "allowed and the victim's side shows it (read back by the toolstack, by the victim "
        "itself, or on the victim's screen after a save and restore); *allowed, no effect*: "
        "allowed but nothing a victim sees changed; *refused*: the errno or reason.  Every cell "
        "matches the prediction from the principal's permissions and C xenstored's rules "
        "unless marked ≠.",
        "",
        "![attacks per configuration](hostile.svg)",
        "",
        "| attack | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for attack, label in attacks(runs):
        row = [label]
        for r in runs:
            c = _cell(r, attack)
            row.append("-" if c is None else verdict(c) + ("" if c.as_predicted else " ≠"))
        lines.append("| " + " | ".join(row) + " |")
    shots = [r for r in runs if r.config.name in r.screens]
    if shots:
        lines += [
            "",
            "V1's screen after its save and restore (top-left corner, QMP `screendump`), "
            "once the attacker had planted its physmap keys:",
            "",
            "| " + " | ".join(r.config.name for r in shots) + " |",
            "|" + " --- |" * len(shots),
            "| "
            + " | ".join(
                f"![V1 in {r.config.name}](screens/{Path(r.screens[r.config.name]).name})"
                for r in shots
            )
            + " |",
        ]
    lines += ["", "What each configuration's device model holds after init:", ""]
    for r in runs:
        err = f" (error: {r.error})" if r.error else ""
        lines.append(f"- **{r.config.name}**: {describe(r.config, r.principal)}{err}")
    lines += ["", "The victim's side of every cell:", ""]
    for r in runs:
        lines.append(f"- **{r.config.name}**:")
        for c in r.cells:
            lines.append(f"  - {c.label}: {verdict(c)}; {c.victim or 'not read back'}")
    return lines


def table(runs: Sequence[ConfigRun]) -> Table:
    t = Table(title="physmap-lab audit --hostile: a compromised device model's reach")
    t.add_column("attack")
    for r in runs:
        t.add_column(r.config.name)
    for attack, label in attacks(runs):
        row = [label]
        for r in runs:
            c = _cell(r, attack)
            if c is None:
                row.append("-")
                continue
            style = {HARM: "red", ALLOWED: "yellow", REFUSED: "green"}[colour(c)]
            mark = "" if c.as_predicted else " ≠"
            row.append(f"[{style}]{verdict(c)}{mark}[/{style}]")
        t.add_row(*row)
    return t


def svg(runs: Sequence[ConfigRun]) -> str:
    """Rows: attacks; columns: configurations; each cell coloured by what it bought."""
    rows = attacks(runs)
    left, top, cw, ch = 190, 96, 118, 30
    width = left + cw * len(runs) + 20
    height = top + ch * len(rows) + 70
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {FONT} font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        _t(10, 22, "What a compromised device model reaches", 'font-size="16" font-weight="bold"'),
    ]
    for i, r in enumerate(runs):
        x = left + cw * (i + 0.5)
        body.append(_t(x, top - 30, r.config.name, 'text-anchor="middle" font-weight="bold"'))
        body.append(_t(x, top - 10, short(r.principal), 'text-anchor="middle" font-size="10"'))
    for j, (attack, label) in enumerate(rows):
        y = top + ch * j
        body.append(_t(10, y + ch * 0.65, label, ""))
        for i, r in enumerate(runs):
            c = _cell(r, attack)
            x = left + cw * i
            fill = "#eee" if c is None else colour(c)
            stroke = "" if c is None or c.as_predicted else ' stroke="black" stroke-width="3"'
            body.append(
                f'<rect x="{x + 2}" y="{y + 2}" width="{cw - 4}" height="{ch - 4}" '
                f'fill="{fill}" rx="3"{stroke}/>'
            )
            if c is not None:
                text = "ok" if c.result == "succeeded" else str(c.errno)
                body.append(
                    _t(x + cw / 2, y + ch * 0.65, text, 'text-anchor="middle" fill="white"')
                )
    y = top + ch * len(rows) + 30
    legend = (
        (HARM, "succeeded, seen by the victim"),
        (ALLOWED, "allowed, no effect"),
        (REFUSED, "refused"),
    )
    for k, (fill, name) in enumerate(legend):
        x = left + k * 200
        body.append(f'<rect x="{x}" y="{y - 11}" width="14" height="14" fill="{fill}"/>')
        body.append(_t(x + 20, y, name, ""))
    body.append("</svg>\n")
    return "\n".join(body)


def _t(x: float, y: float, s: str, attrs: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" {attrs}>{escape(s)}</text>'

"""The migration cells as a terminal table and as ``migration.md``: every physmap request with
the host (source or destination) it went to, the principal and the phase."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from rich.table import Table

from .migrate import DESTINATION, HOSTS, PHASES, SOURCE, MigrationCell
from .scenario import PRINCIPALS

#: The Markdown report of the migration cells, beside report.md.
REPORT_NAME: Final = "migration.md"
_STYLE: Final = {"intact": "green", "corrupt": "yellow", "aborted": "red", "refused": "magenta"}


def _ops(per: dict[str, int]) -> str:
    return " · ".join(str(per.get(p.value, 0)) for p in PRINCIPALS)


def _physmap(cell: MigrationCell, host: str) -> str:
    parts = []
    for p in PRINCIPALS:
        n, ok = cell.physmap_ops[host][p.value], cell.physmap_ops_ok[host][p.value]
        parts.append(str(n) if n == ok else f"{n} ({ok} ok)")
    return " · ".join(parts)


def _yn(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def _code(text: str | None) -> str:
    """``text`` as Markdown code (it may hold backticks itself); ``-`` for none."""
    return "-" if text is None else f"`` {text} ``"


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _row(c: MigrationCell) -> list[str]:
    return [
        c.toolstack,
        c.mode,
        c.device,
        c.outcome,
        _yn(c.fb_hash_matches),
        _yn(c.pointers_valid),
        str(len(c.keys_carried)),
        str(len(c.keys_planted)),
        _physmap(c, SOURCE),
        _physmap(c, DESTINATION),
        _yn(c.planted_before_dm),
        str(c.precopy_rounds),
        _seconds(c.downtime_s),
    ]


_HEADERS: Final = (
    "toolstack",
    "mode",
    "device",
    "outcome",
    "fb ok",
    "ptrs ok",
    "keys carried",
    "keys planted",
    "physmap ops on source",
    "physmap ops on destination",
    "planted before DM",
    "rounds",
    "downtime s",
)


def migration_table(cells: Sequence[MigrationCell]) -> Table:
    table = Table(
        title="physmap-lab audit --migrate: live migration, source host -> destination host",
        caption="physmap ops: requests on /local/domain/0/device-model/<domid>/physmap by "
        "toolstack · device-model · guest on that host (successful ones in brackets when some "
        "failed). planted before DM: the destination's toolstack wrote every key before it "
        "started the device model.",
        caption_justify="left",
    )
    for h in _HEADERS:
        table.add_column(h, no_wrap=True)
    for c in cells:
        row = _row(c)
        style = _STYLE[c.outcome]
        row[3] = f"[{style}]{c.outcome}[/{style}]"
        table.add_row(*row)
    return table


def who_touches(cells: Sequence[MigrationCell]) -> dict[str, Counter[tuple[str, ...]]]:
    """Per mode and toolstack, the physmap requests of its cells by host, principal, phase, op
    and result (each cell's requests once per device)."""
    out: dict[str, Counter[tuple[str, ...]]] = {}
    for c in cells:
        tally = out.setdefault(f"{c.mode} with {c.toolstack}", Counter())
        for r in c.physmap_requests:
            tally[(r.host, r.principal, r.phase, r.op, r.result)] += 1
    return out


def summary_lines(cells: Sequence[MigrationCell]) -> list[str]:
    lines = ["## Summary of findings", ""]
    for key, tally in who_touches(cells).items():
        mine = [c for c in cells if f"{c.mode} with {c.toolstack}" == key]
        outcomes = ", ".join(f"{o} {n}" for o, n in Counter(c.outcome for c in mine).items())
        if not tally:
            lines.append(
                f"- **{key}** ({outcomes}): no principal on either host touches the physmap "
                "keys; the stream carries none."
            )
            continue
        hosts = {host: sorted({who for (h, who, *_rest) in tally if h == host}) for host in HOSTS}
        shown = "; ".join(
            f"on the {host}: {', '.join(who) or 'nobody'}" for host, who in hosts.items()
        )
        carried = max(len(c.keys_carried) for c in mine)
        planted = [c.planted_before_dm for c in mine if c.planted_before_dm is not None]
        note = (
            f" The stream carries {carried} key(s); the destination's toolstack planted them "
            f"before its device model started in {sum(planted)} of {len(planted)} cell(s)."
            if carried
            else " The stream carries no keys."
        )
        lines.append(f"- **{key}** ({outcomes}): physmap requests {shown}.{note}")
    twins = [c for c in cells if c.restore_match is not None]
    if twins:
        same = sum(c.restore_match.matches for c in twins if c.restore_match is not None)
        lines.append(
            f"- {same} of {len(twins)} failing migration cell(s) fail as their save/restore "
            "cell does (same outcome, same last words of the device model, same physmap "
            "requests by the device model that starts on the saved state)."
        )
    return [*lines, ""]


def request_lines(cells: Sequence[MigrationCell]) -> list[str]:
    """Every physmap request of the first device's cells, in order, with its host."""
    lines = ["## Physmap requests, host by host", ""]
    first = next(iter(dict.fromkeys(c.device for c in cells)), None)
    lines += [
        f"Every request on the physmap keys in the {first} cells, in the order xenstored saw "
        "them (each host has its own xenstored). `$DOMID` is the guest's domid on that host.",
        "",
    ]
    for c in cells:
        if c.device != first:
            continue
        lines += [f"### {c.mode} with {c.toolstack}: {c.outcome}", ""]
        if not c.physmap_requests:
            lines += ["No request on either host.", ""]
            continue
        lines += ["| # | host | principal | phase | request | result |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for i, r in enumerate(c.physmap_requests, 1):
            host = f"{r.host} ({c.hosts[r.host]})"
            lines.append(
                f"| {i} | {host} | {r.principal} | {r.phase} | `{r.op} {r.path}` | {r.result} |"
            )
        lines.append("")
    return lines


def twin_lines(cells: Sequence[MigrationCell]) -> list[str]:
    twins = [c for c in cells if c.restore_match is not None]
    if not twins:
        return []
    lines = ["## Failing migrations beside their save/restore cells", ""]
    lines += [
        "| migration cell | outcome | save/restore cell | same outcome | device model's last "
        "line (migration / restore) | destination DM physmap requests (migration / restore) "
        "| matches |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in twins:
        m = c.restore_match
        assert m is not None
        lines.append(
            f"| {c.mode}/{c.device}/{c.toolstack} | {c.outcome} | {m.restore_cell} | "
            f"{_yn(m.same_outcome)} | {_code(m.failure)} / {_code(m.restore_failure)} | "
            f"{'; '.join(m.dm_requests) or 'none'} / "
            f"{'; '.join(m.restore_dm_requests) or 'none'} | {_yn(m.matches)} |"
        )
    return [*lines, ""]


def markdown(cells: Sequence[MigrationCell], command: str) -> str:
    lines = [
        "# Privilege audit: the physmap keys in a live migration",
        "",
        f"Generated by `{command}` ({len(cells)} migration cells). Each cell creates a guest "
        "on the source host, lets it map the VGA BAR and draw, and migrates it live to the "
        "destination host (`xl-sim migrate` to `xl-sim migrate-receive`, pre-copy over TCP) "
        "while it keeps drawing, with both hosts' audit logs on.",
        "",
        *summary_lines(cells),
        "## Phases",
        "",
        f"{', '.join(f'*{p}*' for p in PHASES)}: *precopy* runs from `xl-sim migrate` to the "
        "source's `domain_pause`; *stop-copy* is the last round, the device state and, in "
        "compat mode, the keys read for `EMULATOR_XENSTORE_DATA`, until the destination starts "
        "to restore; *restore* builds the domain there, plants the carried keys and starts the "
        "device model; *handover* starts at the destination's `domain_unpause`, after which "
        "the source destroys its copy. *verify* (the audit reading the destination) is not "
        "counted.",
        "",
        "## Every cell",
        "",
        "Physmap ops: toolstack · device-model · guest on that host; `n (k ok)` when only k of "
        "n succeeded.",
        "",
        "| " + " | ".join(_HEADERS) + " |",
        "| " + " | ".join("---" for _ in _HEADERS) + " |",
        *("| " + " | ".join(_row(c)) + " |" for c in cells),
        "",
        *twin_lines(cells),
        *request_lines(cells),
    ]
    return "\n".join(lines) + "\n"


def write_out(out: Path, cells: Sequence[MigrationCell], command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    path.write_text(markdown(cells, command))
    return [path]

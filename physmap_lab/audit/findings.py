"""What a reader of ``report.md`` needs before the tables: the findings in a few lines, the
legend of every column and colour, and the derived permission sets named and compared.

Everything here is computed from the cells run, so the summary says what this run found.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Final

from ..demo import DEFAULT_QEMU
from .privilege import Permission
from .scenario import PRINCIPALS, Scenario

#: libxl's per-domain trees, which the derived templates keep with each cell's own domid or
#: uuid: ``/libxl/<domid>`` and ``/vm/<uuid>``.
_PER_DOMID: Final = re.compile(r"^/(libxl/\d+|vm/[0-9a-f-]{36})(/|$)")
#: What each outcome means, for the legend.
OUTCOMES: Final = {
    "intact": "the restored device model shows the framebuffer the guest drew, and the guest "
    "reads it back",
    "corrupt": "the domain runs after restore but the screen is wrong: the device model "
    "displays through pointers that no longer point at the guest's framebuffer",
    "aborted": "the restored device model died (an assertion in the compat "
    "`xenforeignmemory_map2` shim), so the restore failed",
    "refused": "the device model would not start: a compat build cannot restrict itself "
    '("xen: failed to restrict")',
}
#: The cells the summary and the derived sets speak for (every mode gets through there).
BASELINE: Final = ("libxl", "privileged")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _where(cells: Sequence[Scenario], all_devices: set[str]) -> str:
    """Which cells these are: the toolstack/dm pairs, and the devices unless all of them."""
    pairs = sorted({f"{s.toolstack}/{s.dm}" + _qemu(s) for s in cells})
    devices = sorted({s.device for s in cells})
    on = "" if set(devices) == all_devices else f" {', '.join(devices)} with"
    return f"{on} {', '.join(pairs)}".strip()


def _qemu(s: Scenario) -> str:
    """`` as QEMU V`` when the cell ran as another QEMU than the first the audit runs."""
    version = getattr(s, "qemu", None)
    return f" as QEMU {version}" if version and version != DEFAULT_QEMU else ""


def outcome_lines(scenarios: Sequence[Scenario]) -> list[str]:
    """Per mode, how many cells ended in each outcome and which ones."""
    lines = []
    for mode in dict.fromkeys(s.mode for s in scenarios):
        cells = [s for s in scenarios if s.mode == mode]
        devices = {s.device for s in cells}
        parts = []
        for outcome in OUTCOMES:
            got = [s for s in cells if s.outcome == outcome]
            if got:
                parts.append(f"{outcome} {len(got)} ({_where(got, devices)})")
        carried = max((len(s.keys_carried) for s in cells), default=0)
        keys = f"; the image carries {_plural(carried, 'physmap key')}" if carried else ""
        lines.append(f"- **{mode}** ({len(cells)} cells): {'; '.join(parts)}{keys}.")
    return lines


def failed_request_lines(scenarios: Sequence[Scenario]) -> list[str]:
    """The physmap requests that failed in the baseline cells, and what they got."""
    lines = []
    for mode in dict.fromkeys(s.mode for s in scenarios):
        cells = [s for s in scenarios if s.mode == mode and (s.toolstack, s.dm) == BASELINE]
        for p in PRINCIPALS:
            failed = sorted(
                {
                    r
                    for s in cells
                    for r in s.principals[p.value].physmap_requests
                    if not r.endswith("-> OK")
                }
            )
            if failed:
                shown = "; ".join(f"`{r}`" for r in failed)
                lines.append(f"- {mode}, {p.value}: {shown}")
    return lines


def summary_lines(scenarios: Sequence[Scenario]) -> list[str]:
    """``## Summary of findings``: outcomes per mode, requests, and the permission sets."""
    lines = ["## Summary of findings", "", "Outcomes per mode:", ""]
    lines += outcome_lines(scenarios)
    sets = least_privilege(scenarios)
    if sets:
        lines += [
            "",
            "Smallest permission sets, from the successful requests of the intact "
            f"{'/'.join(BASELINE)} cells:",
            "",
        ]
        for mode, per in sets.items():
            sizes = ", ".join(f"{who} {len(perms)}" for who, perms in per.items())
            physmap = sorted({str(p) for perms in per.values() for p in perms if p.physmap})
            note = (
                f"; {_plural(len(physmap), 'physmap permission')}, writes under dom0's tree among them"
                if physmap
                else "; nothing on the physmap keys"
            )
            lines.append(f"- **{mode}**: {sizes}{note}.")
    failed = failed_request_lines(scenarios)
    if failed:
        lines += [
            "",
            "Physmap requests that failed in those cells (counted in the charts' hatched part, "
            "never in a permission set):",
            "",
            *failed,
        ]
    return [*lines, ""]


def legend_lines() -> list[str]:
    lines = ["## Legend", ""]
    lines += [f"- *{name}*: {text}." for name, text in OUTCOMES.items()]
    lines += [
        "- **toolstack · dm · guest**: three counts, for the toolstack (`xl-sim`), the device "
        "model (`qemu-model`) and the guest, in that order.",
        "- **xenstore ops**: the xenstore requests each principal made in the cell's create → "
        "draw → save → restore cycle.",
        "- **physmap ops**: those on `/local/domain/0/device-model/<domid>/physmap`; `n (k ok)` "
        "when only k of n succeeded.",
        "- **denied**: requests xenstored refused (EACCES).",
        "- **fb ok**: the restored framebuffer is the one drawn; **ptrs ok**: the pointers the "
        "card derives from its VRAM pointer (QXL's RAM header and rings) are still valid.",
        "- **keys carried**: physmap keys in the image's `EMULATOR_XENSTORE_DATA` record.",
        "- Permissions: `r`/`w` and a path, `$DOMID` the guest's domid, `*` a physmap offset, "
        "`~` the principal's own `/local/domain/<domid of its connection>`.",
        "",
    ]
    return lines


def least_privilege(scenarios: Sequence[Scenario]) -> dict[str, dict[str, list[Permission]]]:
    """Per mode and principal, the union of what the intact baseline cells needed."""
    out: dict[str, dict[str, list[Permission]]] = {}
    for mode in dict.fromkeys(s.mode for s in scenarios):
        cells = _intact_baseline(scenarios, mode)
        out[mode] = {
            p.value: sorted({perm for s in cells for perm in s.needed.get(p.value, [])})
            for p in PRINCIPALS
        }
    return out


def _intact_baseline(scenarios: Sequence[Scenario], mode: str) -> list[Scenario]:
    return [
        s
        for s in scenarios
        if s.mode == mode and (s.toolstack, s.dm) == BASELINE and s.outcome == "intact"
    ]


def set_name(mode: str, who: str, size: int) -> str:
    return f"*{mode} {who} set* ({size})"


def _describe(perms: Sequence[Permission]) -> str:
    return ", ".join(f"`{p}`" for p in perms)


def permission_lines(scenarios: Sequence[Scenario]) -> list[str]:
    """Each mode's derived sets, named; small sets listed in full, big ones by their physmap
    and dom0-owned part; then how the sets of one principal differ from mode to mode."""
    sets = least_privilege(scenarios)
    lines: list[str] = []
    for mode, per in sets.items():
        cells = _intact_baseline(scenarios, mode)
        devices = ", ".join(s.device for s in cells) or "none"
        lines += [f"### {mode}", "", f"From the intact {'/'.join(BASELINE)} cells: {devices}.", ""]
        for who, perms in per.items():
            head = f"- {set_name(mode, who, len(perms))}: {_plural(len(perms), 'permission')}"
            if not perms:
                lines.append(head + ".")
                continue
            if len(perms) <= 3:
                lines.append(f"{head}: {_describe(perms)}.")
                continue
            physmap = [p for p in perms if p.physmap]
            dom0 = [p for p in perms if p.dom0_owned and p.access == "w"]
            lines.append(
                f"{head}; physmap: {_describe(physmap) or 'none'}; writes under dom0-owned "
                f"paths: {_describe(dom0) or 'none'}."
            )
        lines.append("")
    lines += difference_lines(scenarios, sets)
    return lines


def difference_lines(
    scenarios: Sequence[Scenario], sets: Mapping[str, Mapping[str, Sequence[Permission]]]
) -> list[str]:
    """Why one principal's sets differ between modes: each permission one mode needs and the
    next does not, grouped by the devices whose cells asked for it."""
    modes = list(sets)
    lines = ["### How the sets differ", ""]
    for who in (p.value for p in PRINCIPALS):
        for a, b in itertools.pairwise(modes):
            more, fewer = set(sets[a][who]), set(sets[b][who])
            if more == fewer:
                continue
            lines.append(f"- {set_name(a, who, len(more))} and {set_name(b, who, len(fewer))}:")
            for first, second in ((a, b), (b, a)):
                only = (more - fewer) if first == a else (fewer - more)
                lines += _why(scenarios, who, first, second, sorted(only))
    if len(lines) == 2:
        lines.append("- The sets are the same in every mode.")
    return [*lines, ""]


def _why(
    scenarios: Sequence[Scenario], who: str, mode: str, other: str, only: list[Permission]
) -> list[str]:
    if not only:
        return []
    by_devices: dict[tuple[str, ...], list[Permission]] = defaultdict(list)
    for perm in only:
        devices = tuple(
            sorted(
                {
                    s.device
                    for s in _intact_baseline(scenarios, mode)
                    if perm in s.needed.get(who, [])
                }
            )
        )
        by_devices[devices].append(perm)
    counted = {s.device for s in _intact_baseline(scenarios, other)}
    out = []
    for devices, perms in sorted(by_devices.items()):
        missing = sorted(set(devices) - counted)
        if all(_PER_DOMID.match(p.template) for p in perms):
            why = (
                "paths under `/libxl/<domid>` and `/vm/<uuid>` that keep each cell's own domid "
                "and uuid (not folded into `$DOMID`), so every cell counted adds its own"
            )
        elif missing and not set(devices) & counted:
            why = (
                f"asked for only by the {', '.join(devices)} cell(s), which are not intact in "
                f"{other} mode and so not counted there"
            )
        elif any(p.physmap for p in perms):
            why = f"the physmap keys, which {other} mode never reads or writes"
        else:
            why = f"requests {mode} mode makes and {other} mode does not"
        shown = _describe(perms[:4]) + (f" and {len(perms) - 4} more" if len(perms) > 4 else "")
        out.append(f"  - {_plural(len(perms), 'permission')} only in {mode}: {why}: {shown}.")
    return out

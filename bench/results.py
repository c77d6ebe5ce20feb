"""Targets, the results document and its table."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

Section = Literal["throughput", "scale", "saverestore", "attack", "screen", "migration"]
SECTIONS: tuple[Section, ...] = (
    "throughput",
    "scale",
    "saverestore",
    "attack",
    "screen",
    "migration",
)
SCHEMA = 1


@dataclass
class Target:
    """One figure beside its goal.  ``figure`` is ``None`` when it could not be taken."""

    section: Section
    name: str
    figure: float | None
    unit: str
    goal: str
    # ``at_least`` or ``at_most`` the bound; ``None`` for a figure reported with no goal.
    bound: float | None = None
    at_least: bool = True
    note: str = ""
    #: A weaker bound the figure must meet even when it misses ``bound`` (None: no such).
    must: float | None = None
    passed: bool | None = field(init=False, default=None)
    must_passed: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.passed = _meets(self.figure, self.bound, self.at_least)
        self.must_passed = _meets(self.figure, self.must, self.at_least)


def _meets(figure: float | None, bound: float | None, at_least: bool) -> bool | None:
    if figure is None or bound is None:
        return None
    return figure >= bound if at_least else figure <= bound


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (from /proc/cpuinfo), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


@dataclass
class Results:
    quick: bool
    oracle: bool
    command: list[str]
    started: float = field(default_factory=time.time)
    #: The 1, 5 and 15 minute load averages when the run started (others' work skews figures).
    loadavg_at_start: tuple[float, ...] = field(default_factory=os.getloadavg)
    targets: list[Target] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: The xenstored-sim core measured: "compiled" (mypyc) or "pure" (xenstored_sim/compiled.py).
    build: str | None = None

    def add(self, target: Target) -> None:
        self.targets.append(target)

    def document(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "quick": self.quick,
            "oracle": self.oracle,
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "host": {
                "cpus": os.cpu_count(),
                "cpu_model": cpu_model(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "loadavg_at_start": [round(x, 2) for x in self.loadavg_at_start],
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "build": self.build,
            "targets": [asdict(t) for t in self.targets],
            "sections": self.sections,
            "errors": self.errors,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.document(), indent=2, sort_keys=True) + "\n")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "unavailable"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "[dim]n/a[/dim]"
    return "[green]pass[/green]" if passed else "[red]FAIL[/red]"


def print_targets(console: Console, results: Results) -> None:
    table = Table(
        title=f"physmap-lab targets (xenstored-sim build: {results.build or 'n/a'};"
        f" CPU: {cpu_model()}; load average at start"
        f" {' '.join(f'{x:.2f}' for x in results.loadavg_at_start)})",
        show_lines=False,
    )
    for col in ("section", "target", "figure", "goal", "result", "note"):
        table.add_column(col, justify="right" if col == "figure" else "left")
    for t in results.targets:
        verdict = _verdict(t.passed)
        if t.passed is False and t.must is not None:
            verdict = "must: " + _verdict(t.must_passed)
        table.add_row(t.section, t.name, _fmt(t.figure, t.unit), t.goal, verdict, t.note)
    console.print(table)
    for section, why in results.errors.items():
        console.print(f"[red]{section} failed:[/red] {why}")


def print_comparison(
    console: Console, title: str, rows: list[tuple[str, float | None, float | None, str]]
) -> None:
    """``rows`` of (what, ours, C, unit); the ratio column is C time over ours or ours over C
    throughput as the unit says (``ops/s`` is higher-better, ``ns`` lower-better)."""
    table = Table(title=title)
    for col in ("measure", "xenstored-sim", "C xenstored", "speed vs C"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for what, ours, c, unit in rows:
        speed = ratio(ours, c) if unit.endswith("/s") else ratio(c, ours)
        table.add_row(
            what,
            _fmt(ours, unit),
            _fmt(c, unit),
            "unavailable" if speed is None else f"{speed:.2f}x",
        )
    console.print(table)

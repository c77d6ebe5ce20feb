"""The benchmark harness in ``--quick`` mode: it runs end to end and writes the documented JSON.

These tests check shape and consistency only; the figures themselves are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.daemons import ORACLE_DIR
from bench.results import SECTIONS, Target, ratio

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
TARGET_KEYS = {
    "section",
    "name",
    "figure",
    "unit",
    "goal",
    "bound",
    "at_least",
    "note",
    "passed",
    "must",
    "must_passed",
}


def run_bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--output", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def check_target(t: dict[str, Any]) -> None:
    assert set(t) == TARGET_KEYS
    assert t["section"] in SECTIONS
    assert t["goal"] and t["unit"]
    if t["figure"] is None or t["bound"] is None:
        assert t["passed"] is None
    else:
        assert math.isfinite(t["figure"]) and t["figure"] >= 0
        ok = t["figure"] >= t["bound"] if t["at_least"] else t["figure"] <= t["bound"]
        assert t["passed"] is ok
    if t["figure"] is None or t["must"] is None:
        assert t["must_passed"] is None
    else:
        ok = t["figure"] >= t["must"] if t["at_least"] else t["figure"] <= t["must"]
        assert t["must_passed"] is ok


def test_quick_run_without_oracle_covers_every_section(tmp_path: Path) -> None:
    rc, doc, log = run_bench(tmp_path, "--no-oracle")
    assert rc == 0, log
    assert doc["schema"] == 1 and doc["quick"] is True and doc["oracle"] is False
    assert doc["errors"] == {}
    assert set(doc["sections"]) == set(SECTIONS)
    assert doc["build"] in ("compiled", "pure") and doc["host"]["cpu_model"]
    assert f"build: {doc['build']}" in log
    for t in doc["targets"]:
        check_target(t)
    by_section = {s: [t for t in doc["targets"] if t["section"] == s] for s in SECTIONS}
    # Without the oracle every comparison with C is unavailable, and the note says so.
    for t in by_section["throughput"]:
        assert t["figure"] is None and "oracle unavailable" in t["note"]
    ours = doc["sections"]["throughput"]["xsbench_results"]["xenstored-sim"]
    assert ours["1"]["ops_per_s"] > 0 and ours["8"]["ops_per_s"] > 0
    # The in-run ratios of our own daemon are always taken.
    assert len(by_section["scale"]) == 5
    assert len(by_section["screen"]) == 5
    assert all(t["figure"] is not None and t["figure"] > 0 for t in by_section["screen"])
    assert all(t["figure"] is not None for t in by_section["scale"])
    scale = doc["sections"]["scale"]
    assert scale["nodes"] == 100 * 101 + 2 and scale["watches"]["count"] == 1000
    assert all(len(doc["host"][k]) == 3 for k in ("loadavg_at_start", "loadavg_at_end"))
    sr = doc["sections"]["saverestore"]
    modes = sr["modes"]
    assert set(modes) == {"new", "compat"}
    for m in modes.values():
        assert m["image_bytes"] > 16 << 20 and m["downtime_s"] > 0
        assert m["cp_save_mib_s"] > 0 and m["cp_restore_mib_s"] > 0
        # The downtime's phases, each one step of the restore, add up to no more than it.
        phases = m["downtime_phases_s"]
        assert {"memory", "device_model", "unpause"} <= set(phases)
        assert 0 < sum(phases.values()) <= m["downtime_s"]
    assert sr["dm_interpreter_and_imports_s"] > 0 and isinstance(sr["dm_bytecode_fresh"], bool)
    names = {t["name"] for t in by_section["saverestore"]}
    assert {"restore downtime (new)", "device model interpreter and imports"} <= names
    cases = doc["sections"]["migration"]["cases"]
    assert {k for k in cases if k != "network"} == {"new@2000", "compat@2000"}
    for c in (cases["new@2000"], cases["compat@2000"]):
        [run] = c["runs"]
        assert 0 < run["downtime_s"] <= run["total_s"] and run["precopy_rounds"] >= 1
        assert (
            run["pages_per_round"][0] >= 16 * 256
            and sum(run["pages_per_round"]) == run["pages_sent"]
        )
        assert set(run["stop_copy_s"]) == {"suspend", "final_look", "last_round", "tail"} | {
            "destination",
            "handover",
        }
        assert {"loaded_before_end", "index", "device_model"} <= set(run["restore_phases_s"])
    assert len(by_section["migration"]) == 6
    assert "physmap-lab targets" in log


def test_only_runs_the_named_section(tmp_path: Path) -> None:
    rc, doc, log = run_bench(tmp_path, "--no-oracle", "--only", "scale")
    assert rc == 0, log
    assert set(doc["sections"]) == {"scale"}
    assert {t["section"] for t in doc["targets"]} == {"scale"}


@pytest.mark.skipif(not ORACLE_DIR.exists(), reason="../shared/oracle is absent")
def test_quick_throughput_against_the_oracle_gives_ratios(tmp_path: Path) -> None:
    rc, doc, log = run_bench(tmp_path, "--only", "throughput")
    assert rc == 0, log
    assert doc["oracle"] is True
    bench = doc["sections"]["throughput"]["xsbench_results"]
    for t in doc["targets"]:
        check_target(t)
        assert t["figure"] is not None and t["passed"] is not None
    one = next(t for t in doc["targets"] if t["name"] == "xsbench 1 client vs C")
    assert one["figure"] == pytest.approx(
        bench["xenstored-sim"]["1"]["ops_per_s"] / bench["C xenstored"]["1"]["ops_per_s"]
    )


@pytest.mark.parametrize(
    ("figure", "bound", "at_least", "passed"),
    [
        (0.6, 0.5, True, True),
        (0.4, 0.5, True, False),
        (0.5, 0.5, True, True),
        (1.3, 1.2, False, False),
        (1.2, 1.2, False, True),
        (None, 0.5, True, None),
        (3.0, None, True, None),
    ],
)
def test_target_verdict(
    figure: float | None, bound: float | None, at_least: bool, passed: bool | None
) -> None:
    t = Target("scale", "x", figure, "x", "goal", bound, at_least)
    assert t.passed is passed


def test_ratio_is_unavailable_without_both_figures() -> None:
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0.0) is None
    assert ratio(3.0, 2.0) == 1.5


@pytest.mark.parametrize(
    ("figure", "passed", "must_passed"),
    [(1.1, True, True), (0.9, False, True), (0.7, False, False), (None, None, None)],
)
def test_target_with_a_must_bound(
    figure: float | None, passed: bool | None, must_passed: bool | None
) -> None:
    t = Target("throughput", "x", figure, "x", "≥ 1.0x (must ≥ 0.8x)", 1.0, must=0.8)
    assert (t.passed, t.must_passed) == (passed, must_passed)

"""Closed-loop throughput and test-xenstore latency, ours beside C.

Both daemons and every client run pinned to CPU 0: on a VM a cross-CPU wake-up costs about
70 µs against 12 µs on one CPU, so unpinned figures measure the hypervisor, not the daemon
(oracle README, "Measured figures").
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .daemons import (
    ORACLE_DIR,
    BenchError,
    Xenstored,
    c_xenstored,
    find_test_xenstore,
    oracle_present,
    pinned,
    xenstored_sim,
)
from .results import Results, Target, ratio

HERE = Path(__file__).resolve().parent
CPU0 = {0}


@dataclass(frozen=True)
class Sizes:
    seconds: float
    runs: int
    iters: int
    repeats: int
    tests: tuple[str, ...] | None  # None: every test test-xenstore lists


FULL = Sizes(seconds=3.0, runs=3, iters=1000, repeats=3, tests=None)
QUICK = Sizes(seconds=0.3, runs=1, iters=50, repeats=1, tests=("read 1", "write 1", "ta empty"))

_RUN = re.compile(r"-> (\d+) ops/s")
_MEDIAN = re.compile(r"median: clients=\d+ (\d+) ops/s(?:.*daemon ([\d.]+) us CPU/op)?")
_AVG = re.compile(r"^(.*?)\s*: avg: (\d+) ns", re.M)


def xsbench_script() -> tuple[Path, str]:
    oracle = ORACLE_DIR / "xsbench.py"
    if oracle.exists():
        return oracle, "shared/oracle/xsbench.py"
    return HERE / "closedloop.py", "bench/closedloop.py"


def run_xsbench(d: Xenstored, clients: int, sizes: Sizes) -> dict[str, Any]:
    script, _ = xsbench_script()
    cmd = ["taskset", "-c", "0", sys.executable, str(script), "--socket", d.socket]
    cmd += ["--clients", str(clients), "--seconds", str(sizes.seconds), "--runs", str(sizes.runs)]
    cmd += ["--daemon-pid", str(d.pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    m = _MEDIAN.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise BenchError(f"xsbench on {d.label} failed: {out.stderr[-1500:]}")
    return {
        "ops_per_s": int(m.group(1)),
        "daemon_us_cpu_per_op": float(m.group(2)) if m.group(2) else None,
        "runs_ops_per_s": [int(x) for x in _RUN.findall(out.stdout)],
    }


def list_tests(binary: str, libs: str) -> list[str]:
    out = subprocess.run(
        [binary, "-l"],
        env=dict(os.environ, LD_LIBRARY_PATH=libs),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split(":", 1)[0].strip() for line in out.splitlines() if ":" in line]


def run_test_xenstore(
    binary: str, libs: str, d: Xenstored, test: str, iters: int
) -> tuple[int | None, str]:
    """Average ns per iteration test-xenstore reports for one test, or None and why."""
    env = dict(os.environ, LD_LIBRARY_PATH=libs, XENSTORED_PATH=d.socket)
    cmd = ["taskset", "-c", "0", binary, "-t", test, "-i", str(iters)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for name, ns in _AVG.findall(out.stdout):
        if name.strip() == test and out.returncode == 0:
            return int(ns), ""
    return None, (out.stdout + out.stderr).strip()[-300:]


def measure(results: Results, sizes: Sizes, use_oracle: bool) -> dict[str, Any]:
    with_c = use_oracle and oracle_present()
    section: dict[str, Any] = {
        "placement": "cpu0 (daemon and clients pinned with taskset)",
        "xsbench": xsbench_script()[1],
        "oracle": with_c,
        "sizes": sizes.__dict__,
    }
    with ExitStack() as stack:
        daemons: list[Xenstored] = [stack.enter_context(xenstored_sim())]
        oracle_env: dict[str, str] | None = None
        if with_c:
            c, oracle_env = stack.enter_context(c_xenstored())
            daemons.append(c)
        stack.enter_context(pinned([d.pid for d in daemons], CPU0))

        bench: dict[str, dict[str, Any]] = {d.label: {} for d in daemons}
        for clients in (1, 8):
            for d in daemons:
                bench[d.label][str(clients)] = run_xsbench(d, clients, sizes)
        section["xsbench_results"] = bench
        tests, section["test_xenstore"] = _test_xenstore(daemons, oracle_env, sizes)

    _xsbench_targets(results, bench)
    medians = section["test_xenstore"]["avg_ns_median"]
    _test_xenstore_targets(results, tests, medians, with_c)
    return section


def _test_xenstore(
    daemons: list[Xenstored], oracle_env: dict[str, str] | None, sizes: Sizes
) -> tuple[list[str], dict[str, Any]]:
    """Every test (or the chosen ones) on every daemon, ``sizes.repeats`` times, interleaved:
    the tests run and their figures."""
    found = find_test_xenstore(oracle_env)
    if found is None:
        raise BenchError("test-xenstore is missing: run `make setup`")
    binary, libs = found
    tests = list(sizes.tests) if sizes.tests else list_tests(binary, libs)
    avgs: dict[str, dict[str, list[int]]] = {d.label: {t: [] for t in tests} for d in daemons}
    failures: dict[str, dict[str, str]] = {d.label: {} for d in daemons}
    for _ in range(sizes.repeats):
        for t in tests:
            for d in daemons:
                ns, why = run_test_xenstore(binary, libs, d, t, sizes.iters)
                if ns is None:
                    failures[d.label][t] = why
                else:
                    avgs[d.label][t].append(ns)
    medians = {
        label: {t: (statistics.median(v) if v else None) for t, v in per.items()}
        for label, per in avgs.items()
    }
    return tests, {
        "binary": binary,
        "iters": sizes.iters,
        "repeats": sizes.repeats,
        "avg_ns_median": medians,
        "avg_ns_runs": avgs,
        "failures": failures,
    }


def _xsbench_targets(results: Results, bench: dict[str, dict[str, Any]]) -> None:
    """Closed-loop throughput and daemon CPU per op, ours against C's."""
    ours = bench["xenstored-sim"]
    theirs = bench.get("C xenstored")
    for n in ("1", "8"):
        mine = float(ours[n]["ops_per_s"])
        c_ops = float(theirs[n]["ops_per_s"]) if theirs else None
        results.add(
            Target(
                "throughput",
                f"xsbench {n} client{'s' if n != '1' else ''} vs C",
                ratio(mine, c_ops),
                "x",
                "≥ 1.0x (must ≥ 0.8x)",
                1.0,
                must=0.8,
                note=f"ours {mine:,.0f} ops/s"
                + (f", C {c_ops:,.0f} ops/s" if c_ops else ", oracle unavailable"),
            )
        )
    for n in ("1", "8"):
        mine_us = ours[n]["daemon_us_cpu_per_op"]
        c_us = theirs[n]["daemon_us_cpu_per_op"] if theirs else None
        note = "no figure for ours" if mine_us is None else f"ours {mine_us:.1f} µs"
        note += f", C {c_us:.1f} µs" if c_us is not None else ", oracle unavailable"
        results.add(
            Target(
                "throughput",
                f"daemon CPU per op, {n} client{'s' if n != '1' else ''}, ours / C",
                ratio(mine_us, c_us),
                "x",
                "≤ 1.25x",
                1.25,
                at_least=False,
                note=note,
            )
        )


def _test_xenstore_targets(
    results: Results, tests: list[str], medians: dict[str, dict[str, Any]], with_c: bool
) -> None:
    """Each test-xenstore test's speed, C's time over ours."""
    for t in tests:
        mine_ns = medians["xenstored-sim"][t]
        c_ns = medians["C xenstored"][t] if with_c else None
        note = "failed on ours" if mine_ns is None else f"ours {mine_ns:,.0f} ns"
        if with_c:
            note += f", C {c_ns:,.0f} ns" if c_ns is not None else ", failed on C"
        else:
            note += ", oracle unavailable"
        results.add(
            Target(
                "throughput",
                f"test-xenstore '{t}' speed vs C",
                ratio(c_ns, mine_ns),
                "x",
                "≥ 0.8x",
                0.8,
                note=note,
            )
        )


def comparison_rows(section: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    rows: list[tuple[str, float | None, float | None, str]] = []
    bench = section["xsbench_results"]
    for clients in ("1", "8"):
        c = bench.get("C xenstored", {}).get(clients, {}).get("ops_per_s")
        rows.append(
            (
                f"xsbench {clients} client(s)",
                bench["xenstored-sim"][clients]["ops_per_s"],
                c,
                "ops/s",
            )
        )
    med = section["test_xenstore"]["avg_ns_median"]
    for t, ns in med["xenstored-sim"].items():
        rows.append((f"test-xenstore {t}", ns, med.get("C xenstored", {}).get(t), "ns"))
    return rows

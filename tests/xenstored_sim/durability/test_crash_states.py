"""Power cuts, not only SIGKILL: the daemon recovers from every state a crash may leave.

A workload (writes, a directory, transactions, permissions, domain introduce and release,
compactions) runs through the real daemon with its file operations recorded; every crash
state the record allows (:mod:`xenstored_sim.core.crashfs`) is materialised and the daemon
restarted on it (:mod:`.crash_explorer`).  Under ``--sync always`` and ``batch`` the store must
hold every change acknowledged before the crash point; under every policy it must start and
be a prefix of the history.

``$XS_CRASH_WORKLOAD`` (``full``, the default, or ``small``) chooses the workload and
``$XS_CRASH_STATES`` how many distinct states to check per policy (a seeded sample; ``all``
checks every one, as ``make crash-states`` does).  ``$XS_CRASH_SEED`` repeats a sample.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from .crash_explorer import (
    check_all,
    distinct_states,
    full_workload,
    record,
    small_workload,
)

#: States checked per policy in ``make test`` (each is one daemon start).
DEFAULT_SAMPLE = {"always": 8, "batch": 8, "none": 6}
WORKLOADS = {"small": (small_workload, 700, 1), "full": (full_workload, 1024, 2)}


@pytest.mark.parametrize("sync", ["always", "batch", "none"])
async def test_every_crash_state_recovers(tmp_path: Path, sync: str) -> None:
    name = os.environ.get("XS_CRASH_WORKLOAD", "full")
    steps, journal_max, compactions = WORKLOADS[name]
    rec = await record(tmp_path, sync, steps(), journal_max)
    assert rec.renames >= compactions, "the workload must reach snapshot compaction"
    total, distinct = distinct_states(rec)
    states = sorted(distinct.values(), key=lambda s: (s.point, s.files))
    wanted = os.environ.get("XS_CRASH_STATES", str(DEFAULT_SAMPLE[sync]))
    seed = int(os.environ.get("XS_CRASH_SEED", random.randrange(1 << 32)))
    if wanted != "all" and int(wanted) < len(states):
        # Half of the sample, or as many as there are, from torn or reordered writes.
        rnd = random.Random(seed)
        mixed = [s for s in states if s.mixed]
        some = rnd.sample(mixed, min(len(mixed), int(wanted) // 2))
        rest = [s for s in states if s not in some]
        states = some + rnd.sample(rest, int(wanted) - len(some))
    outcomes = await check_all(rec, states, tmp_path / "scratch")
    failures = [o for o in outcomes if o.problem is not None]
    print(
        f"crash states, workload {name}, --sync {sync}: {len(rec.ops)} file operations, "
        f"{len(rec.history) - 1} changes, {rec.renames} compactions; {total} states generated, "
        f"{len(distinct)} distinct, {len(outcomes)} checked, {len(failures)} failed (seed {seed})"
    )
    assert len(outcomes) == len(states)
    assert not failures, "\n".join(
        f"crash after op {o.state.point} {[(n, len(c)) for n, c in o.state.files]}: {o.problem}"
        for o in failures[:5]
    )


_STRACE_CALLS = (
    "openat,write,pwrite64,fsync,fdatasync,ftruncate,rename,renameat,renameat2,unlink,unlinkat"
)


def _strace_counts(text: str, state: str) -> Counter[str]:
    """Mutating calls on the state directory in ``strace -f -y`` output."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        m = re.match(r"(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)", line)
        if m is None or "= -1" in line or state not in line:
            continue
        call, args = m.groups()
        if call == "openat" and "O_CREAT" in args:
            counts["open"] += 1
        elif call in ("write", "pwrite64") and args.startswith(tuple("0123456789")):
            counts["write"] += args.split("<", 1)[1].startswith(state)
        elif call in ("fsync", "fdatasync", "ftruncate"):
            counts[call] += 1
        elif call.startswith("rename"):
            counts["rename"] += 1
        elif call.startswith("unlink"):
            counts["unlink"] += 1
    return counts


async def test_the_file_layer_sees_every_operation(tmp_path: Path) -> None:
    """The recorded operations are all the daemon does on its state directory: strace of the
    same run counts the same creations, writes, syncs, truncations, renames and unlinks."""
    trace = tmp_path / "strace.out"
    wrap = ["strace", "-f", "-y", "-qq", "-o", str(trace), "-e", f"trace={_STRACE_CALLS}"]
    rec = await record(tmp_path, "batch", small_workload(), 700, wrap=wrap)
    seen = _strace_counts(trace.read_text(), rec.state_dir)
    logged: Counter[str] = Counter()
    for op in rec.ops:
        kind = "fsync" if op.op == "fsync_dir" else op.op
        if kind == "open" and not op.creat:
            continue
        if kind not in ("close", "mkdir"):
            logged[kind] += 1
    dir_syncs = sum(op.op == "fsync_dir" for op in rec.ops)
    assert rec.renames >= 1 and dir_syncs >= 2 and logged["fsync"] > dir_syncs
    assert +seen == +logged

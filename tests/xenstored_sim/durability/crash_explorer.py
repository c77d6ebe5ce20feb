"""The crash-state explorer: record a workload's file operations, rebuild every state a power
cut may leave (:mod:`xenstored_sim.core.crashfs`), and restart the real daemon on each.

:func:`record` runs a workload through a real ``xenstored-sim --state-dir`` whose file layer
(:mod:`xenstored_sim.server.fileio`) logs every operation.  One client does the changes one
after another; after each reply it notes the log's length (the *acknowledgement point*: every
operation the daemon did before that reply is in the log by then) and reads back the whole
workload subtree and the domain table (the *history*: the store after each change).

:func:`check` materialises one crash state in a scratch directory, starts the daemon on it and
reads the same things back.  The daemon must start (a traceback or a refusal is a failure: a
power cut is not damage from outside), and what it holds must be one entry of the history at
or after the last change acknowledged before the crash point (under ``--sync none``, any
entry): nothing acknowledged lost, nothing half-applied, no transaction torn.  It must then
take and keep a new change.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from physmap_lab.stack import terminate
from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.core.crashfs import CrashState, FileOp, explore, ops_before, parse_log
from xenstored_sim.server.fileio import LOG_ENV
from xenstored_sim.wire import Op, Packet, PacketDecoder, XsError, encode

from .conftest import REPO, wait_connectable

ROOT = "/wl"
DOMIDS = (7, 8)
# Bounds the waits of one start; times nothing.
_START_LIMIT = 30.0


@dataclass(frozen=True)
class Pipelined:
    """New nodes written by requests that leave in one ``send`` on a connection of their
    own: the daemon handles them in one wake-up, so under ``--sync batch`` their records
    share one group commit, and a crash may keep any subset of them."""

    writes: tuple[tuple[str, str], ...]

    async def run(self, sock: Path) -> None:
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(
                b"".join(
                    encode(Packet(int(Op.WRITE), i + 1, 0, f"{path}\0{value}".encode()))
                    for i, (path, value) in enumerate(self.writes)
                )
            )
            decoder = PacketDecoder()
            replies = 0
            while replies < len(self.writes):
                data = await stream.receive_some(65536)
                assert data, "xenstored-sim hung up"
                decoder.receive_data(data)
                while isinstance(reply := decoder.next_packet(), Packet):
                    assert reply.op == int(Op.WRITE), reply
                    replies += 1

    def partial(self, done: Observation) -> list[Observation]:
        """The store with some of the writes lost, from the store with all of them."""
        nodes, domains = done
        paths = [path for path, _ in self.writes]
        out = []
        for n in range(1, len(paths)):
            for lost in itertools.combinations(paths, n):
                out.append((tuple(x for x in nodes if x[0] not in lost), domains))
        return out


Step = Callable[[XsClient], Awaitable[None]] | Pipelined
Observation = tuple[tuple[tuple[str, bytes, tuple[str, ...]], ...], tuple[int, ...]]


async def _tx(xs: XsClient, writes: dict[str, str], removes: tuple[str, ...] = ()) -> None:
    async with xs.transaction() as t:
        for path, value in writes.items():
            await t.write(path, value)
        for path in removes:
            await t.rm(path)


def small_workload() -> list[Step]:
    """Writes, a directory, a transaction, permissions, a domain, a batch of writes, and
    one compaction (with ``--journal-max 700``)."""
    return [
        lambda xs: xs.write(f"{ROOT}/a", "1"),
        lambda xs: xs.mkdir(f"{ROOT}/dir"),
        lambda xs: _tx(xs, {f"{ROOT}/t1": "a", f"{ROOT}/dir/t2": "b"}, (f"{ROOT}/a",)),
        lambda xs: xs.set_perms(f"{ROOT}/dir", ["n0", "r7"]),
        lambda xs: xs.introduce(7, 1, 1),
        lambda xs: xs.write(f"{ROOT}/big", "y" * 700),
        Pipelined(((f"{ROOT}/p1", "one"), (f"{ROOT}/p2", "two"))),
        lambda xs: xs.write(f"{ROOT}/after", "z"),
    ]


def full_workload() -> list[Step]:
    """The small workload and more: release, a second domain, removals, a value spanning
    sectors, further transactions, and several compactions."""
    return [
        *small_workload(),
        lambda xs: xs.rm(f"{ROOT}/dir"),
        lambda xs: _tx(xs, {f"{ROOT}/t1": "c", f"{ROOT}/t3": "d" * 300}),
        lambda xs: xs.release(7),
        lambda xs: xs.introduce(8, 2, 2),
        lambda xs: xs.write(f"{ROOT}/a", "2" * 1200),
        lambda xs: xs.set_perms(f"{ROOT}/t1", ["n8"]),
        lambda xs: _tx(xs, {f"{ROOT}/t4": "e", f"{ROOT}/t5": "f"}, (f"{ROOT}/t3",)),
        Pipelined(((f"{ROOT}/p1", "one"), (f"{ROOT}/p2", "two"), (f"{ROOT}/p3", "three"))),
        lambda xs: xs.write(f"{ROOT}/last", "end"),
    ]


async def observe(xs: XsClient) -> Observation:
    """The workload subtree (path, value, permissions) and which workload domains exist."""
    nodes: list[tuple[str, bytes, tuple[str, ...]]] = []

    async def walk(path: str) -> None:
        try:
            value = await xs.read(path)
        except XsError as exc:
            assert exc.errno_name == "ENOENT"
            return
        nodes.append((path, value, tuple(await xs.get_perms(path))))
        for name in await xs.directory(path):
            await walk(f"{path}/{name}")

    await walk(ROOT)
    domains = tuple([d for d in DOMIDS if await xs.is_domain_introduced(d)])
    return tuple(nodes), domains


def _env(log: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    if log is not None:
        env[LOG_ENV] = str(log)
    return env


def _command(rundir: Path, state: Path, sync: str, journal_max: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xenstored_sim",
        "--rundir",
        str(rundir),
        "--state-dir",
        str(state),
        "--sync",
        sync,
        "--journal-max",
        str(journal_max),
    ]


@dataclass
class Recording:
    """A workload's file operations, the store after each change, and where in the
    operations each change was acknowledged."""

    sync: str
    journal_max: int
    state_dir: str
    ops: list[FileOp]
    history: list[Observation]
    #: partial[j]: the stores a crash in the middle of change j may leave besides
    #: history[j - 1] and history[j] (the writes of a :class:`Pipelined` step are separate
    #: changes with one acknowledgement point)
    partial: list[list[Observation]]
    #: acked[j]: number of operations logged when change j's reply had arrived (0 for j=0,
    #: the store before any change)
    acked: list[int]
    renames: int = field(init=False)

    def __post_init__(self) -> None:
        self.renames = sum(op.op == "rename" for op in self.ops)

    def required(self, point: int) -> int:
        """The history index every crash at ``point`` must reach (0 without a guarantee)."""
        if self.sync == "none":
            return 0
        return max(j for j, at in enumerate(self.acked) if at <= point)


async def record(
    tmp: Path, sync: str, steps: list[Step], journal_max: int, wrap: list[str] | None = None
) -> Recording:
    """Run ``steps`` through a recorded daemon on an empty state directory, then SIGKILL it
    (``wrap``: a command the daemon runs under, such as strace)."""
    log = tmp / "fileops.jsonl"
    state = tmp / "state"
    state.mkdir(parents=True)
    rundir = tmp / "run"
    cmd = [*(wrap or []), *_command(rundir, state, sync, journal_max)]
    with open(tmp / "record.log", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(log), stderr=err, start_new_session=True)
    try:
        with trio.fail_after(_START_LIMIT):
            await wait_connectable(rundir / "socket", proc)
        async with open_xenstore(rundir / "socket") as xs:
            history = [await observe(xs)]
            partial: list[list[Observation]] = [[]]
            acked = [0]
            for step in steps:
                if isinstance(step, Pipelined):
                    await step.run(rundir / "socket")
                else:
                    await step(xs)
                acked.append(log.stat().st_size)
                history.append(await observe(xs))
                partial.append(step.partial(history[-1]) if isinstance(step, Pipelined) else [])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the daemon, and strace if it runs under it
        proc.wait()
    text = log.read_bytes()
    return Recording(
        sync,
        journal_max,
        str(state),
        parse_log(text),
        history,
        partial,
        [ops_before(text, at) for at in acked],
    )


def distinct_states(rec: Recording) -> tuple[int, dict[object, CrashState]]:
    """(number of states generated, the distinct ones): of equal states, the one with the
    latest crash point is kept, whose guarantee is the strictest."""
    total = 0
    distinct: dict[object, CrashState] = {}
    for state in explore(rec.ops, rec.state_dir):
        total += 1
        distinct[state.key()] = state
    return total, distinct


@dataclass
class Outcome:
    state: CrashState
    problem: str | None


def materialise(state: CrashState, where: Path) -> None:
    where.mkdir(parents=True)
    for rel in state.dirs:
        (where / rel).mkdir(parents=True, exist_ok=True)
    for rel, content in state.files:
        (where / rel).write_bytes(content)


async def check(rec: Recording, state: CrashState, scratch: Path) -> Outcome:
    """Start the daemon on one crash state and judge what it recovered."""
    materialise(state, scratch / "state")
    rundir = scratch / "run"
    cmd = _command(rundir, scratch / "state", rec.sync, rec.journal_max)
    errpath = scratch / "stderr"
    try:
        with open(errpath, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(None), stderr=err)
        try:
            problem = await _judge(rec, state, rundir, proc)
        finally:
            status = terminate(proc)
        stderr = errpath.read_text()
        if problem is None and "Traceback" in stderr:
            problem = f"traceback on stderr: {stderr.strip().splitlines()[-1]}"
        if problem is None and status != 0:
            problem = f"exit status {status} after SIGTERM"
        if problem is not None:
            problem = f"{problem} [stderr: {stderr.strip()[-300:]!r}]"
        return Outcome(state, problem)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _judge(
    rec: Recording, state: CrashState, rundir: Path, proc: subprocess.Popen[bytes]
) -> str | None:
    sock = rundir / "socket"
    with trio.fail_after(_START_LIMIT):
        while not sock.exists():
            if proc.poll() is not None:
                return f"refused to start (status {proc.returncode})"
            await trio.sleep(0.01)
        await wait_connectable(sock, proc)
    async with open_xenstore(sock) as xs:
        got = await observe(xs)
        need = rec.required(state.point)
        matches = [j for j, h in enumerate(rec.history) if h == got]
        matches += [j - 1 for j, hs in enumerate(rec.partial) if got in hs]
        if not matches:
            return f"recovered a store that is no prefix of the history: {got!r}"
        if max(matches) < need:
            return f"lost acknowledged changes: recovered state {max(matches)}, acked {need}"
        await xs.write("/probe", "after the crash")
    async with open_xenstore(sock) as xs:
        if await xs.read("/probe") != b"after the crash":
            return "the recovered daemon lost a new change"
    return None


async def check_all(
    rec: Recording, states: list[CrashState], scratch: Path, parallel: int = 2
) -> list[Outcome]:
    """Check states, ``parallel`` daemons at a time."""
    outcomes: list[Outcome] = []
    limit = trio.CapacityLimiter(parallel)

    async def one(i: int, state: CrashState) -> None:
        async with limit:
            outcomes.append(await check(rec, state, scratch / f"s{i}"))

    async with trio.open_nursery() as nursery:
        for i, state in enumerate(states):
            nursery.start_soon(one, i, state)
    return outcomes

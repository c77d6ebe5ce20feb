"""Random differential run: seeded scenarios (``diffgen.py``) against C xenstored 4.17 and
xenstored-sim, compared reply for reply and watch event for watch event.

    python tests/xenstored_sim/oracle/diffrun.py --seed 1 --n 1000     # C against xenstored-sim
    python tests/xenstored_sim/oracle/diffrun.py --against c --fresh    # self-check: C against C

Determinism: after every step each open connection gets a pipelined GET_DOMAIN_PATH and is read
up to that reply, so everything a step caused is in the transcript of that step (both daemons
queue an event before the reply of the request causing it).  The one order C itself leaves open,
a RELEASE's reply against its own events (it depends on C's connection list), is normalised.

Daemons are reused across scenarios: before every scenario, fresh or not, ``prepare`` releases
the scenario's domains, removes every node but the initial three and rewrites those, so the store
is the initial one; DIRECTORY_PART generations are printed relative to the generation of ``/``
right after that (C's counter only ever grows).  Transaction ids count per connection and every
scenario has new connections and new domids.  ``--fresh`` starts new daemons per scenario
instead; C reused against C fresh is the check that this reuse changes nothing.  A daemon is
restarted after any difference.  When C dies (Debian's 4.17.5 aborts in
conn_delete_all_transactions()), the scenario is counted apart and C restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import diffdaemons
from diffgen import (
    DIRECTORY,
    DIRECTORY_PART,
    ERROR,
    GET_DOMAIN_PATH,
    GET_PERMS,
    INTRODUCE,
    MKDIR,
    OP_NAMES,
    READ,
    RELEASE,
    RM,
    SET_PERMS,
    SET_TARGET,
    TRANSACTION_START,
    WATCH_EVENT,
    WRITE,
    Scenario,
    Step,
    args,
    scenario,
)

from xenstored_sim.core.engine import atoi

HEADER = struct.Struct("=IIII")
SYNC_ID = 0x5EED0000
RECV_LIMIT = 10.0  # seconds a reply may take before the connection counts as hung


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(RECV_LIMIT)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.req_id = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the daemon dropped us: the reads say so
            self.sock.sendall(data)

    def recv(self) -> tuple[int, int, int, bytes] | None:
        while True:
            if len(self.buf) >= 16:
                op, rid, tx, n = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 16 + n:
                    body = self.buf[16 : 16 + n]
                    self.buf = self.buf[16 + n :]
                    return op, rid, tx, body
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk

    def read_until(self, req_id: int) -> list[tuple[int, int, int, bytes]]:
        got = []
        while True:
            pkt = self.recv()
            if pkt is None:
                return got
            got.append(pkt)
            if pkt[0] != WATCH_EVENT and pkt[1] == req_id:
                return got

    def close(self) -> None:
        self.sock.close()


def frame(op: int, req_id: int, tx: int, payload: bytes) -> bytes:
    return HEADER.pack(op, req_id, tx, len(payload)) + payload


def sync_frame() -> bytes:
    return frame(GET_DOMAIN_PATH, SYNC_ID, 0, b"0\0")


@dataclass
class Run:
    """One daemon's transcript of one scenario."""

    lines: list[str] = field(default_factory=list)
    died: bool = False


def _exchange(conn: Conn, data: bytes, expect: int | None) -> list[tuple[int, int, int, bytes]]:
    conn.send(data + sync_frame())
    got = conn.read_until(SYNC_ID)
    if conn.closed or not got or got[-1][1] != SYNC_ID:
        conn.closed = True
    return got


_ONEARG_OPS = frozenset((DIRECTORY, READ, GET_PERMS, MKDIR, RM))


def stale_errno(step: Step) -> bool:
    """Requests C answers with whatever errno an earlier call left behind (or dies on, when
    that is 0): onearg() failing in the get_node_canonicalized() callers, and SET_PERMS on an
    ``@`` name refused by set_perms_special().  Any error is right for these."""
    p = step.payload
    if step.op in _ONEARG_OPS:
        return not p or p.find(b"\0") != len(p) - 1
    return step.op == SET_PERMS and p.startswith(b"@")


def _fmt(pkt: tuple[int, int, int, bytes], step: Step | None, base: int) -> str:
    op, rid, tx, body = pkt
    if op == ERROR and step is not None and rid != SYNC_ID and stale_errno(step):
        body = b"(any errno)"
    if op == WATCH_EVENT:
        return f"event {body!r}"
    if rid == SYNC_ID:
        return f"sync {OP_NAMES.get(op, op)} {body!r}"
    if op == DIRECTORY_PART and step is not None and step.op == DIRECTORY_PART:
        gen, sep, rest = body.partition(b"\0")
        if gen.isdigit():
            body = b"gen%+d" % (int(gen) - base) + sep + rest
    return f"{OP_NAMES.get(op, f'OP{op}')} req={rid} tx={tx} {body!r}"


def introduced(sc: Scenario) -> tuple[set[int], set[int]]:
    """Every domid the scenario may have introduced, and those named by SET_TARGET (C frees
    a target's domain too early: those are released last)."""
    domids, targets = set(sc.domids), set(sc.targets)
    for step in sc.steps:
        ids = [atoi(a) & 0xFFFFFFFF for a in step.payload.split(b"\0")[:2]]
        if step.op == INTRODUCE and ids:
            domids.add(ids[0])
        elif step.op == SET_TARGET:
            targets.update(ids)
    domids.discard(0)
    return domids, targets


def prepare(daemon: diffdaemons.Daemon, sc: Scenario | None) -> int:
    """Back to the initial store; returns the generation of ``/`` afterwards."""
    c = Conn(daemon.socket)
    rid = 0

    def req(op: int, payload: bytes) -> tuple[int, bytes]:
        nonlocal rid
        rid += 1
        c.send(frame(op, rid, 0, payload))
        for pkt in c.read_until(rid):
            if pkt[1] == rid and pkt[0] != WATCH_EVENT:
                return pkt[0], pkt[3]
        raise ConnectionError(f"{daemon.kind} daemon stopped answering")

    try:
        if sc is not None:
            domids, targets = introduced(sc)
            for d in sorted(domids, key=lambda d: d in targets):
                req(RELEASE, args(str(d)))
        for path in ("/", "/tool", "/tool/xenstored"):
            req(SET_PERMS, args(path, "n0"))
        for parent, keep in (("/", b"tool"), ("/tool", b"xenstored"), ("/tool/xenstored", None)):
            _, kids = req(DIRECTORY, args(parent))
            for kid in kids.split(b"\0"):
                if kid and kid != keep:
                    req(RM, args(parent.rstrip("/") + "/" + kid.decode()))
        for path in ("/tool/xenstored", "/tool", "/"):
            req(WRITE, path.encode() + b"\0")
        typ, body = req(DIRECTORY_PART, args("/", "0"))
        assert typ == DIRECTORY_PART and body.endswith(b"\0tool\0\0"), body
        return int(body.split(b"\0")[0])
    finally:
        c.close()


def responsive(daemon: diffdaemons.Daemon) -> bool:
    """Does the daemon still answer a request on a new connection?  (An aborting C may
    still hold its listening socket open while it dumps core.)"""
    try:
        c = Conn(daemon.socket)
    except OSError:
        return False
    try:
        c.sock.settimeout(2.0)
        c.send(frame(GET_DOMAIN_PATH, 1, 0, b"0\0"))
        got = c.read_until(1)
        return bool(got) and got[-1][1] == 1
    finally:
        c.close()


def _wait_guest(daemon: diffdaemons.Daemon, domid: int) -> Conn | None:
    path = daemon.guest_socket(domid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            return Conn(path)
        except OSError:
            time.sleep(0.005)
    return None


class Player:
    """Plays one scenario on one daemon and records everything each connection receives."""

    def __init__(self, daemon: diffdaemons.Daemon, base: int) -> None:
        self.daemon, self.base = daemon, base
        self.run = Run()
        self.conns: dict[str, Conn | None] = {}
        self.txids: dict[str, int] = {}
        self.tx_starts = 0

    def send(self, step: Step) -> None:
        """The step on its connection, with a pipelined sync behind it."""
        name, lines = step.conn, self.run.lines
        if name not in self.conns:
            self.conns[name] = Conn(self.daemon.socket)
        conn = self.conns[name]
        ref = None
        if step.op == TRANSACTION_START and not step.oversize:
            ref, self.tx_starts = f"t{self.tx_starts}", self.tx_starts + 1
        if conn is None or conn.closed:
            lines.append(f"[{name}] closed")
            return
        if step.oversize:
            data = frame(WRITE, 1, 0, b"x" * 4097)
        else:
            tx = step.tx if isinstance(step.tx, int) else self.txids.get(step.tx, 4242)
            conn.req_id += 1
            data = frame(step.op, conn.req_id, tx, step.payload)
        got = _exchange(conn, data, conn.req_id)
        for op, rid, _, body in got:
            if ref is not None and op == TRANSACTION_START and rid == conn.req_id:
                self.txids[ref] = int(body.rstrip(b"\0") or b"0")
        replies = [_fmt(p, step, self.base) for p in got]
        if step.op == RELEASE:  # C's own order of reply and events varies
            replies.sort(key=lambda s: not s.startswith("event"))
        lines += [f"[{name}] {line}" for line in replies]
        if conn.closed:
            lines.append(f"[{name}] connection closed")

    def fence(self, acting: str) -> None:
        """A sync on every other open connection: it collects the events the step caused."""
        for other, oc in self.conns.items():
            if other == acting or oc is None or oc.closed:
                continue
            got = _exchange(oc, b"", None)
            self.run.lines += [f"[{other}] {_fmt(p, None, self.base)}" for p in got]
            if oc.closed:
                self.run.lines.append(f"[{other}] connection closed")

    def closed(self) -> set[str]:
        return {n for n, c in self.conns.items() if c is not None and c.closed}

    def died(self, newly_closed: bool) -> bool:
        if newly_closed and not responsive(self.daemon):
            deadline = time.monotonic() + 5  # a dropped connection and no answer: dying
            while self.daemon.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        return not self.daemon.alive()

    def connect_guests(self, guests: list[int]) -> None:
        for domid in guests:
            self.conns[f"g{domid}"] = _wait_guest(self.daemon, domid)
            if self.conns[f"g{domid}"] is None:
                self.run.lines.append(f"[g{domid}] no guest socket")

    def close(self) -> None:
        for oc in self.conns.values():
            if oc is not None:
                oc.close()


def play(daemon: diffdaemons.Daemon, sc: Scenario, base: int) -> Run:
    """Run ``sc`` on ``daemon`` (already prepared) and record everything received."""
    player = Player(daemon, base)
    try:
        for i, step in enumerate(sc.steps):
            if i == sc.prologue:  # the guests connect once introduced, before anything else
                player.connect_guests(sc.guests)
            was_closed = player.closed()
            player.run.lines.append(f">> {step.describe()}")
            player.send(step)
            player.fence(step.conn)
            if player.died(bool(player.closed() - was_closed)):
                player.run.died = True
                break
    except OSError as exc:
        player.run.died = not daemon.alive()
        player.run.lines.append(f"{type(exc).__name__}: {exc}")
    finally:
        player.close()
    return player.run


@dataclass
class Tally:
    total: int = 0
    same: int = 0
    differ: int = 0
    c_died: int = 0
    seconds: float = 0.0
    reports: list[str] = field(default_factory=list)


def first_difference(sc: Scenario, a: Run, b: Run, names: tuple[str, str]) -> str:
    i = 0
    while i < min(len(a.lines), len(b.lines)) and a.lines[i] == b.lines[i]:
        i += 1
    steps_done = sum(1 for line in a.lines[: i + 1] if line.startswith(">>"))
    head = [line for line in a.lines[:i] if line.startswith(">>")][-1:] or ["(start)"]
    out = [f"seed {sc.seed} scenario {sc.index}: first difference after {head[0]}"]
    out.append(f"  {names[0]}: {a.lines[i] if i < len(a.lines) else '(end)'}")
    out.append(f"  {names[1]}: {b.lines[i] if i < len(b.lines) else '(end)'}")
    out.append(f"  reproduce: make diff-c SEED={sc.seed} ONLY={sc.index}; steps:")
    out += [f"    {s.describe()}" for s in sc.steps[: max(steps_done, 1)]]
    return "\n".join(out)


class Side:
    """One side of the comparison: a daemon kind, restarted when it must be."""

    def __init__(self, kind: str, fresh: bool) -> None:
        self.kind, self.fresh = kind, fresh
        self.daemon: diffdaemons.Daemon | None = None

    def run(self, sc: Scenario) -> Run:
        if self.daemon is None or self.fresh or not self.daemon.alive():
            self.restart()
        assert self.daemon is not None
        try:
            try:
                base = prepare(self.daemon, None)
            except (OSError, ConnectionError, AssertionError):
                self.restart()  # the previous scenario left it dead or hung
                base = prepare(self.daemon, None)
            return play(self.daemon, sc, base)
        finally:
            if self.daemon.alive():
                try:
                    prepare(self.daemon, sc)
                except (OSError, ConnectionError, AssertionError):
                    self.restart()

    def restart(self) -> None:
        self.stop()
        self.daemon = diffdaemons.start(self.kind)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


_TALLY_LOCK = threading.Lock()


class Lane:
    """A C daemon and the daemon compared with it, running scenarios one after the other."""

    def __init__(self, against: str, fresh: bool) -> None:
        self.against = against
        self.left, self.right = Side("c", False), Side(against, fresh)
        self.pool = ThreadPoolExecutor(2)

    def run(self, sc: Scenario, tally: Tally, out: object) -> None:
        fa, fb = self.pool.submit(self.left.run, sc), self.pool.submit(self.right.run, sc)
        a, b = fa.result(), fb.result()
        with _TALLY_LOCK:
            tally.total += 1
            if a.died or (self.against == "c" and b.died):
                tally.c_died += 1
            elif a.lines == b.lines:
                tally.same += 1
                return
            else:
                tally.differ += 1
                names = ("C", "xenstored-sim" if self.against == "sim" else "C (second)")
                report = first_difference(sc, a, b, names)
                tally.reports.append(report)
                if out is not None:
                    print(report, file=out, flush=True)  # type: ignore[call-overload]
        self.left.restart()  # nothing that differed or died is trusted further
        self.right.restart()

    def close(self) -> None:
        self.pool.shutdown()
        self.left.stop()
        self.right.stop()


def run_seed(
    seed: int,
    n: int,
    against: str = "sim",
    fresh: bool = False,
    only: int | None = None,
    out: object = None,
    jobs: int = 1,
) -> Tally:
    """Compare C with ``against`` (``sim``, or ``c`` for the self-check) over ``n`` scenarios,
    on ``jobs`` lanes of daemons at once (C's guest rings wait on a polling bridge)."""
    tally = Tally()
    start = time.monotonic()
    indices = [only] if only is not None else list(range(n))
    lanes = [Lane(against, fresh) for _ in range(max(1, min(jobs, len(indices))))]

    def work(k: int) -> None:
        for index in indices[k :: len(lanes)]:
            lanes[k].run(scenario(seed, index), tally, out)

    try:
        with ThreadPoolExecutor(len(lanes)) as pool:
            for f in [pool.submit(work, k) for k in range(len(lanes))]:
                f.result()
    finally:
        for lane in lanes:
            lane.close()
    tally.seconds = time.monotonic() - start
    tally.reports.sort()
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, action="append", help="seed (repeatable; default 1)")
    ap.add_argument("--n", type=int, default=200, help="scenarios per seed (default 200)")
    ap.add_argument("--only", type=int, help="run scenario ONLY of the seed alone")
    ap.add_argument("--against", choices=("sim", "c"), default="sim")
    ap.add_argument("--fresh", action="store_true", help="a new daemon per scenario")
    ap.add_argument("--jobs", type=int, default=4, help="daemon pairs at once (default 4)")
    ap.add_argument("--show", action="store_true", help="print the scenario's C transcript")
    opts = ap.parse_args()
    if not diffdaemons.oracle_present():
        print(f"diffrun: no C xenstored oracle at {diffdaemons.ORACLE}", file=sys.stderr)
        return 2
    if opts.show and opts.only is not None:
        side = Side("c", True)
        try:
            for line in side.run(scenario((opts.seed or [1])[0], opts.only)).lines:
                print(line)
        finally:
            side.stop()
        return 0
    bad = 0
    for seed in opts.seed or [1]:
        t = run_seed(seed, opts.n, opts.against, opts.fresh, opts.only, sys.stdout, opts.jobs)
        counted = t.total - t.c_died
        pct = 100.0 * t.same / counted if counted else 100.0
        print(
            f"seed {seed}: {t.total} scenarios, {t.same} identical ({pct:.1f} %), "
            f"{t.differ} differing, {t.c_died} left out (C died); "
            f"{t.seconds:.1f} s, {t.total / t.seconds:.1f} scenarios/s",
            flush=True,
        )
        bad += t.differ
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Under attack: a well-behaved client's latency while guests attack xenstored-sim.

Two well-behaved clients, a guest on its own guest socket and the privileged toolstack
socket, time READ and WRITE one request at a time, first with the attacker domains idle and
then while every attacker, through its own guest socket:

- floods requests without ever reading a reply (the daemon must stop reading that connection,
  not queue without bound: docs/xenstore.md, 'Security advisories the tests cover', the
  outstanding-request quota);
- holds the most watches and transactions its quotas allow, the watches on its own home so
  that its flood fires events it never reads;
- builds a tree as deep as the path-length limit allows.

The attackers run in a separate process, so that their Python does not share this process's
interpreter lock with the timed client.  p50 and p99 are reported with and without the attack,
and their ratio; they are reported figures, with no goal.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, cast

from xenhost import RunDir
from xenstored_sim.wire import HEADER, NEED_DATA, Op, Packet, PacketDecoder

from .daemons import BenchError, xenstored_sim
from .results import Results, Target, ratio
from .wireclient import WireConn, timed_calls

VALUE = b"v" * 16
#: The well-behaved guest's domid; attackers count up from ATTACKER_BASE.
GOOD_DOMID = 50
ATTACKER_BASE = 100
#: Upper bound on what an attacker tries to take of any one quota.
GRAB_MAX = 5000


@dataclass(frozen=True)
class Sizes:
    attackers: int
    ops: int  # timed requests per op kind and client
    settle: float  # seconds the attack runs before the timing starts


FULL = Sizes(attackers=8, ops=3000, settle=1.0)
QUICK = Sizes(attackers=2, ops=200, settle=0.2)


# --------------------------------------------------------------------------------------------
# The attackers (a child process)


class _Raw:
    """A blocking connection that returns ERROR replies instead of raising."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = PacketDecoder()
        self.next_id = 0

    def call(self, op: Op, payload: bytes, tx: int = 0) -> tuple[bool, bytes]:
        self.next_id += 1
        want = self.next_id
        self.sock.sendall(HEADER.pack(op, want, tx, len(payload)) + payload)
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise BenchError("the daemon closed an attacker's connection")
            self.decoder.receive_data(data)
            while (pkt := self.decoder.next_packet()) is not NEED_DATA:
                assert isinstance(pkt, Packet)
                if pkt.req_id == want and pkt.op != Op.WATCH_EVENT:
                    return pkt.op != Op.ERROR, pkt.payload


def _hold_quotas(guest: str, home: bytes) -> tuple[_Raw, dict[str, int]]:
    """Take the most watches, transactions and tree depth the daemon allows this domain."""
    conn = _Raw(guest)
    held = {"watches": 0, "transactions": 0, "depth": 0}
    for i in range(GRAB_MAX):
        ok, _ = conn.call(Op.WATCH, home + b"\0w%d\0" % i)
        if not ok:
            break
        held["watches"] += 1
    for i in range(GRAB_MAX):
        ok, reply = conn.call(Op.TRANSACTION_START, b"\0")
        if not ok:
            break
        tx = int(reply.rstrip(b"\0"))
        conn.call(Op.WRITE, home + b"/tx%d\0" % i + VALUE, tx)
        held["transactions"] += 1
    path = home + b"/deep"
    for _ in range(GRAB_MAX):
        ok, _ = conn.call(Op.WRITE, path + b"\0" + VALUE)
        if not ok:
            break
        held["depth"] += 1
        path += b"/d"
    return conn, held


def _flood_socket(guest: str) -> socket.socket:
    """A connection that will only ever send."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(guest)
    sock.setblocking(False)
    return sock


def _attack(
    rundir: str, domids: list[int], ready: Event, stop: Event, report: Queue[dict[str, int]]
) -> None:
    """Body of the attacker process: hold the quotas, then flood until ``stop``."""
    holders: list[_Raw] = []
    floods: list[tuple[socket.socket, bytes]] = []
    for d in domids:
        guest = str(RunDir(rundir).guest_socket(d))
        home = b"/local/domain/%d" % d
        conn, held = _hold_quotas(guest, home)
        report.put({"domid": d, **held})
        holders.append(conn)
        floods.append((_flood_socket(guest), home))
    sel = selectors.DefaultSelector()
    for sock, home in floods:
        sel.register(sock, selectors.EVENT_WRITE, home)
    ready.set()
    req = 0
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.05):
            sock, home = cast(socket.socket, key.fileobj), key.data
            batch = []
            for _ in range(64):
                req += 1
                payload = home + b"/f%d\0" % (req % 64) + VALUE
                batch.append(HEADER.pack(Op.WRITE, req & 0xFFFFFFFF, 0, len(payload)) + payload)
            try:
                sock.send(b"".join(batch))
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                sel.unregister(sock)  # the daemon dropped this flood: its own business
    sel.close()
    for sock, _ in floods:
        sock.close()
    for conn in holders:
        conn.sock.close()


# --------------------------------------------------------------------------------------------
# The measurement


def _introduce(priv: WireConn, domid: int) -> None:
    priv.call(Op.INTRODUCE, b"%d\0%d\0%d\0" % (domid, 1, 1))
    home = b"/local/domain/%d" % domid
    priv.call(Op.WRITE, home + b"\0")
    priv.call(Op.SET_PERMS, home + b"\0n%d\0" % domid)


def _wait_path(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear")
        time.sleep(0.01)


def _percentiles(ns: list[int]) -> dict[str, float]:
    cuts = statistics.quantiles(ns, n=100, method="inclusive")
    return {"p50_us": cuts[49] / 1000, "p99_us": cuts[98] / 1000, "n": len(ns)}


def _keys(base: bytes, n: int) -> Iterator[bytes]:
    for i in range(n):
        yield base + b"/k%d" % (i % 50)


def _timings(conn: WireConn, base: bytes, ops: int) -> dict[str, dict[str, float]]:
    conn.call(Op.WRITE, base + b"\0")
    writes = timed_calls(conn, ((Op.WRITE, k + b"\0" + VALUE) for k in _keys(base, ops)))
    reads = timed_calls(conn, ((Op.READ, k + b"\0") for k in _keys(base, ops)))
    return {"read": _percentiles(reads), "write": _percentiles(writes)}


def measure(results: Results, sz: Sizes) -> dict[str, Any]:
    """Time the well-behaved clients without and with the attack; add the targets."""
    section: dict[str, Any] = {"attackers": sz.attackers, "ops": sz.ops}
    with xenstored_sim() as d:
        rundir = str(Path(d.socket).parent)
        priv = WireConn(d.socket)
        attackers = [ATTACKER_BASE + i for i in range(sz.attackers)]
        for domid in (GOOD_DOMID, *attackers):
            _introduce(priv, domid)
        guest_path = RunDir(Path(rundir)).guest_socket(GOOD_DOMID)
        _wait_path(guest_path)
        guest = WireConn(str(guest_path))
        clients = {
            "guest": (guest, b"/local/domain/%d/good" % GOOD_DOMID),
            "toolstack": (priv, b"/tool/good"),
        }
        without = {name: _timings(c, base, sz.ops) for name, (c, base) in clients.items()}
        with_attack = _under_attack(d.socket, attackers, clients, sz, section)
        held = _held_quotas(priv, attackers)
        guest.close()
        priv.close()
    section["without"] = without
    section["with"] = with_attack
    section["attacker_nodes"] = held
    _add_targets(results, section, sz)
    return section


def _under_attack(
    socket: str,
    attackers: list[int],
    clients: dict[str, tuple[WireConn, bytes]],
    sz: Sizes,
    section: dict[str, Any],
) -> dict[str, dict[str, dict[str, float]]]:
    """The clients' timings while the attackers, in a process of their own, hold their
    quotas; what each attacker holds goes in ``section["held"]``."""
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    report: Queue[dict[str, int]] = ctx.Queue()
    rundir = str(Path(socket).parent)
    proc = ctx.Process(target=_attack, args=(rundir, attackers, ready, stop, report), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise BenchError("the attackers did not get their quotas within 60 s")
        section["held"] = [report.get(timeout=10) for _ in attackers]
        time.sleep(sz.settle)
        with_attack = {name: _timings(c, base, sz.ops) for name, (c, base) in clients.items()}
        alive = os.path.exists(socket) and proc.is_alive()
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not alive:
        raise BenchError("the attacker process died during the measurement")
    return with_attack


def _add_targets(results: Results, section: dict[str, Any], sz: Sizes) -> None:
    """Each client's p99 under attack over its p99 without, reported."""
    without, with_attack = section["without"], section["with"]
    for name in without:
        for op in ("read", "write"):
            a, b = without[name][op], with_attack[name][op]
            section.setdefault("p99_ratio", {})[f"{name}_{op}"] = ratio(b["p99_us"], a["p99_us"])
            results.add(
                Target(
                    "attack",
                    f"{name} {op.upper()} p99 under attack / without",
                    ratio(b["p99_us"], a["p99_us"]),
                    "x",
                    "reported",
                    note=f"p50 {a['p50_us']:.0f} → {b['p50_us']:.0f} µs, "
                    f"p99 {a['p99_us']:.0f} → {b['p99_us']:.0f} µs, "
                    f"{sz.attackers} attacking guests",
                )
            )


def _held_quotas(priv: WireConn, attackers: list[int]) -> dict[str, int]:
    """Nodes each attacker owns at the end, from the daemon's own accounting."""
    out: dict[str, int] = {}
    for domid in attackers:
        try:
            text = priv.call(Op.CONTROL, b"quota\0%d\0" % domid).rstrip(b"\0").decode()
        except BenchError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "nodes":
                out[str(domid)] = int(value)
    return out

"""A tree of a million nodes.

The tree is written over the privileged socket as ``/local/domain/<d>/n<k>`` with many
requests in flight on several connections.  Three daemons run side by side: one with the 1k-node
tree, one with the full tree, and one with the full tree and the watches.  Latencies are taken one
request at a time, with the daemons and this process on CPU 0 (see ``throughput``), in rounds
that visit the three daemons in turn, so that a slow moment of the machine weighs on every
figure of a ratio alike.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from xenstored_sim.wire import Op

from .daemons import BenchError, Xenstored, mem_total_bytes, pinned, rss_bytes, xenstored_sim
from .results import Results, Target, ratio
from .wireclient import WireConn, pipeline, timed_calls

CPU0 = {0}
VALUE = b"v" * 8
MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    domains: int
    per_domain: int
    small_domains: int  # the 1k-node baseline tree
    ops: int  # timed requests per latency sample
    repeats: int
    watches: int
    connections: int = 4
    window: int = 256


FULL = Sizes(domains=10_000, per_domain=100, small_domains=10, ops=2000, repeats=5, watches=10_000)
QUICK = Sizes(domains=100, per_domain=100, small_domains=10, ops=200, repeats=1, watches=1000)


def _node(d: int, k: int) -> bytes:
    return b"/local/domain/%d/n%d" % (d, k)


def _writes(first: int, last: int, per: int) -> Iterator[tuple[Op, bytes]]:
    for d in range(first, last):
        for k in range(per):
            yield Op.WRITE, _node(d, k) + b"\0" + VALUE


def _median_of(samples: list[list[int]]) -> float:
    return statistics.median(statistics.median(s) for s in samples)


@dataclass
class _Samples:
    """Per-round samples of one daemon: READ, WRITE, 3-node transaction, unrelated WRITE."""

    reads: list[list[int]] = field(default_factory=list)
    writes: list[list[int]] = field(default_factory=list)
    txs: list[list[int]] = field(default_factory=list)

    def round(self, conn: WireConn, domains: int, sz: Sizes, rng: random.Random) -> None:
        """One round over nodes spread across the tree."""
        picks = [_node(rng.randrange(domains), rng.randrange(sz.per_domain)) for _ in range(sz.ops)]
        self.reads.append(timed_calls(conn, ((Op.READ, p + b"\0") for p in picks)))
        self.writes.append(timed_calls(conn, ((Op.WRITE, p + b"\0" + VALUE) for p in picks)))
        self.txs.append([_transaction(conn, rng.randrange(domains)) for _ in range(sz.ops // 4)])

    def medians(self) -> dict[str, float]:
        return {
            "read_ns": _median_of(self.reads),
            "write_ns": _median_of(self.writes),
            "tx3_ns": _median_of(self.txs),
        }


def _transaction(conn: WireConn, d: int) -> int:
    """TRANSACTION_START, three WRITEs in it, commit: ns for the whole sequence."""
    t0 = time.perf_counter_ns()
    tx = int(conn.call(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    for k in range(3):
        conn.call(Op.WRITE, _node(d, k) + b"\0" + VALUE, tx)
    conn.call(Op.TRANSACTION_END, b"T\0", tx)
    return time.perf_counter_ns() - t0


@dataclass
class _Daemon:
    """A daemon of the side-by-side run, its main connection and its bulk writers."""

    d: Xenstored
    main: WireConn
    conns: list[WireConn]

    @classmethod
    def start(cls, stack: ExitStack, sz: Sizes) -> _Daemon:
        d = stack.enter_context(xenstored_sim())
        daemon = cls(d, WireConn(d.socket), [WireConn(d.socket) for _ in range(sz.connections)])
        stack.callback(daemon.close)
        daemon.main.call(Op.WRITE, b"/bench/warm\0x")
        pipeline(daemon.conns, _writes(0, sz.small_domains, sz.per_domain), sz.window)
        return daemon

    def close(self) -> None:
        for c in [self.main, *self.conns]:
            c.close()


def measure(results: Results, sz: Sizes) -> dict[str, Any]:
    rng = random.Random(7)
    section: dict[str, Any] = {"sizes": sz.__dict__}
    with ExitStack() as stack:
        small = _Daemon.start(stack, sz)
        big = _Daemon.start(stack, sz)
        watched = _Daemon.start(stack, sz)
        rss0 = rss_bytes(big.d.pid)
        grown = _grow(big.d.pid, big.conns, sz)
        rss1 = rss_bytes(big.d.pid)
        if grown.stopped_early:
            raise BenchError(f"stopped at {grown.nodes} nodes: daemon RSS over half of memory")
        _grow(watched.d.pid, watched.conns, sz)
        watchers, fan_s = _fan_out(watched.d.socket, watched.main, sz)
        for w in watchers:
            stack.callback(w.close)
        section.update(
            small_nodes=sz.small_domains * (sz.per_domain + 1) + 2,
            nodes=grown.nodes,
            stopped_early_for_memory=grown.stopped_early,
            populate_seconds=grown.seconds,
            populate_writes_per_s=(grown.done - sz.small_domains) * sz.per_domain / grown.seconds,
            rss_before=rss0,
            rss_after=rss1,
            rss_bytes_per_node=(rss1 - rss0) / grown.nodes,
        )
        samples = [_Samples(), _Samples(), _Samples()]
        pids = [small.d.pid, big.d.pid, watched.d.pid]
        with pinned([*pids, 0], CPU0):
            for _ in range(sz.repeats):
                samples[0].round(small.main, sz.small_domains, sz, rng)
                samples[1].round(big.main, grown.done, sz, rng)
                samples[2].round(watched.main, grown.done, sz, rng)
    section["small"] = samples[0].medians()
    section["big"] = samples[1].medians()
    section["watches"] = {
        "count": sz.watches,
        "fanout_seconds": fan_s,
        "fanout_events_per_s": sz.watches / fan_s,
        "unrelated_write_ns_without": section["big"]["write_ns"],
        "unrelated_write_ns_with": _median_of(samples[2].writes),
    }
    _add_targets(results, section)
    return section


@dataclass(frozen=True)
class _Grown:
    done: int  # domains written
    nodes: int
    stopped_early: bool
    seconds: float


def _grow(pid: int, conns: list[WireConn], sz: Sizes) -> _Grown:
    """Write the rest of the tree in steps, watching memory: stop short rather than exhaust
    the machine."""
    limit = mem_total_bytes() // 2
    done = sz.small_domains
    step = max(1, 50_000 // sz.per_domain)
    stopped_early = False
    t0 = time.perf_counter()
    while done < sz.domains:
        upto = min(sz.domains, done + step)
        pipeline(conns, _writes(done, upto, sz.per_domain), sz.window)
        done = upto
        if rss_bytes(pid) > limit:
            stopped_early = done < sz.domains
            break
    seconds = time.perf_counter() - t0
    return _Grown(done, done * (sz.per_domain + 1) + 2, stopped_early, seconds)


def _fan_out(socket: str, main: WireConn, sz: Sizes) -> tuple[list[WireConn], float]:
    """``sz.watches`` watches on one node over new connections, then one write to it: the
    connections and the seconds until every event arrived."""
    # Every WATCH fires once when registered (docs/xenstore.md, 'Watches').
    watchers = [WireConn(socket) for _ in range(sz.connections)]
    counts = [_share(sz.watches, len(watchers), i) for i in range(len(watchers))]
    for i, (w, n) in enumerate(zip(watchers, counts, strict=True)):
        regs = [(Op.WATCH, b"/bench/fan\0w%dt%d\0" % (i, j)) for j in range(n)]
        pipeline([w], regs, sz.window)
        w.wait_events(n)
    t0 = time.perf_counter()
    main.call(Op.WRITE, b"/bench/fan\0go")
    for w, n in zip(watchers, counts, strict=True):
        w.wait_events(2 * n)
    return watchers, time.perf_counter() - t0


def _add_targets(results: Results, section: dict[str, Any]) -> None:
    """The section's figures against their goals."""
    small, big = section["small"], section["big"]
    n_label = f"{section['nodes']:,} nodes"
    rss0, rss1 = section["rss_before"], section["rss_after"]
    results.add(
        Target(
            "scale",
            f"RSS per node at {n_label}",
            section["rss_bytes_per_node"],
            "B",
            "≤ 400 B",
            400,
            False,
            note=f"VmRSS {rss0 / MIB:.0f} → {rss1 / MIB:.0f} MiB; "
            f"populated at {section['populate_writes_per_s']:,.0f} writes/s",
        )
    )
    for key, what in (("read_ns", "READ"), ("write_ns", "WRITE")):
        results.add(
            Target(
                "scale",
                f"{what} latency {n_label} / 1k",
                ratio(big[key], small[key]),
                "x",
                "≤ 1.2x",
                1.2,
                False,
                note=f"{small[key] / 1000:.1f} → {big[key] / 1000:.1f} µs",
            )
        )
    results.add(
        Target(
            "scale",
            f"3-node transaction {n_label} / 1k",
            ratio(big["tx3_ns"], small["tx3_ns"]),
            "x",
            "≤ 1.2x (same cost)",
            1.2,
            False,
            note=f"{small['tx3_ns'] / 1000:.1f} → {big['tx3_ns'] / 1000:.1f} µs",
        )
    )
    _add_watch_target(results, section["watches"])


def _add_watch_target(results: Results, watches: dict[str, Any]) -> None:
    """A write elsewhere with every watch registered, against one without."""
    before, after = watches["unrelated_write_ns_without"], watches["unrelated_write_ns_with"]
    results.add(
        Target(
            "scale",
            f"unrelated WRITE with {watches['count']:,} watches / without",
            ratio(after, before),
            "x",
            "≤ 1.2x (not slower)",
            1.2,
            False,
            note=f"{before / 1000:.1f} → {after / 1000:.1f} µs; fan-out "
            f"{watches['count'] / watches['fanout_seconds']:,.0f} events/s",
        )
    )


def _share(total: int, parts: int, index: int) -> int:
    """How many of ``total`` round-robin items land on part ``index``."""
    return total // parts + (1 if index < total % parts else 0)

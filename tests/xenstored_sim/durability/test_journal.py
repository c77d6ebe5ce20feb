"""The pure journal: framing, torn tails, and snapshot + replay against the live engine."""

from __future__ import annotations

import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xenstored_sim.core import ConnKind, XenstoreEngine
from xenstored_sim.core.journal import (
    FRAME_HEADER,
    Journal,
    JournalError,
    apply_records,
    frame,
    load_snapshot,
    read_frames,
    touches_domains,
)
from xenstored_sim.wire import Op, Packet


class Driver:
    """Runs requests on a journaled engine and keeps the records, as the daemon does."""

    def __init__(self) -> None:
        self.engine = XenstoreEngine()
        self.journal = Journal(self.engine)
        self.priv = self.engine.connect(ConnKind.SOCKET)
        self.guests: dict[int, int] = {}
        self.records: list[bytes] = []
        self.snapshot: bytes | None = None
        self.after_snapshot: list[bytes] = []
        self.req_id = 0
        #: the generation counter when the last record was taken
        self.recorded_generation = self.engine.store.generation

    def req(self, conn: int, op: Op, payload: bytes, tx: int = 0) -> bytes:
        self.req_id += 1
        box = self.engine.handle(conn, Packet(int(op), self.req_id, tx, payload))
        rec = self.journal.record(touches_domains(int(op), payload))
        if rec is not None:
            self.records.append(rec)
            self.after_snapshot.append(rec)
            self.recorded_generation = self.engine.store.generation
        for cid in box.closed:
            self.guests = {d: c for d, c in self.guests.items() if c != cid}
        reply = [p for c, p in box if c == conn and p.op != Op.WATCH_EVENT]
        assert len(reply) == 1
        return reply[0].payload

    def guest(self, domid: int) -> int | None:
        if domid not in self.engine.domains:
            return None
        if domid not in self.guests:
            self.guests[domid] = self.engine.connect(ConnKind.GUEST, domid)
        return self.guests[domid]

    def take_snapshot(self) -> None:
        self.snapshot = self.journal.snapshot(1)
        self.after_snapshot = []
        self.recorded_generation = self.engine.store.generation


def state(engine: XenstoreEngine) -> dict[str, Any]:
    store = engine.store
    return {
        "nodes": {
            path: (n.value, n.perms, list(n.children), n.generation)
            for path, n in store.nodes.items()
        },
        "domains": {d.domid: (d.port, d.target) for d in engine.domains.values()},
        "special": dict(engine.special_perms),
        "owned": {k: v for k, v in store.owned.items() if v},
    }


def restored(snapshot: bytes | None, payloads: list[bytes]) -> XenstoreEngine:
    engine = XenstoreEngine()
    if snapshot is not None:
        load_snapshot(engine, snapshot)
    apply_records(engine, payloads)
    return engine


def unframe(records: list[bytes]) -> list[bytes]:
    payloads, end, problem = read_frames(b"".join(records))
    assert problem is None and end == sum(map(len, records))
    return payloads


PATHS = ["/a", "/a/b", "/a/b/c", "/d", "/local/domain/5/x", "/local/domain/6", "/d/e"]
DOMIDS = [5, 6]
path_st = st.sampled_from(PATHS)
perms_st = st.lists(
    st.tuples(st.sampled_from("nrwb"), st.sampled_from([0, 5, 6])), min_size=1, max_size=3
).map(lambda es: [f"{m}{d}".encode() for m, d in es])
value_st = st.binary(max_size=8)

simple_op = st.one_of(
    st.tuples(st.just("write"), path_st, value_st),
    st.tuples(st.just("mkdir"), path_st),
    st.tuples(st.just("rm"), path_st),
    st.tuples(st.just("perms"), path_st, perms_st),
)
op_st = st.one_of(
    simple_op,
    st.tuples(st.just("tx"), st.lists(simple_op, max_size=4), st.booleans()),
    st.tuples(st.just("introduce"), st.sampled_from(DOMIDS), st.integers(1, 9)),
    st.tuples(st.just("release"), st.sampled_from(DOMIDS)),
    st.tuples(st.just("target"), st.sampled_from(DOMIDS), st.sampled_from(DOMIDS)),
    st.tuples(st.just("guest"), st.sampled_from(DOMIDS), simple_op),
    st.tuples(
        st.just("special"), st.sampled_from(["@introduceDomain", "@releaseDomain"]), perms_st
    ),
    st.tuples(st.just("snapshot")),
)


def run_simple(d: Driver, conn: int, op: tuple[Any, ...], tx: int = 0) -> None:
    kind, path = op[0], op[1].encode()
    if kind == "write":
        d.req(conn, Op.WRITE, path + b"\0" + op[2], tx)
    elif kind == "mkdir":
        d.req(conn, Op.MKDIR, path + b"\0", tx)
    elif kind == "rm":
        d.req(conn, Op.RM, path + b"\0", tx)
    else:
        d.req(conn, Op.SET_PERMS, path + b"\0" + b"\0".join(op[2]) + b"\0", tx)


def run(d: Driver, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "tx":
        tx = int(d.req(d.priv, Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        for inner in op[1]:
            run_simple(d, d.priv, inner, tx)
        d.req(d.priv, Op.TRANSACTION_END, (b"T" if op[2] else b"F") + b"\0", tx)
    elif kind == "introduce":
        d.req(d.priv, Op.INTRODUCE, b"%d\x001\x00%d\0" % (op[1], op[2]))
    elif kind == "release":
        d.req(d.priv, Op.RELEASE, b"%d\0" % op[1])
    elif kind == "target":
        d.req(d.priv, Op.SET_TARGET, b"%d\0%d\0" % (op[1], op[2]))
    elif kind == "guest":
        conn = d.guest(op[1])
        if conn is not None:
            run_simple(d, conn, op[2])
    elif kind == "special":
        d.req(d.priv, Op.SET_PERMS, op[1].encode() + b"\0" + b"\0".join(op[2]) + b"\0")
    elif kind == "snapshot":
        d.take_snapshot()
    else:
        run_simple(d, d.priv, op)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=30))
# RELEASE marks the domain's entries on other nodes as ignored without a new generation.
@example(
    ops=[("mkdir", "/a"), ("introduce", 6, 1), ("perms", "/a", [b"n0", b"n6"]), ("release", 6)]
)
def test_snapshot_plus_replay_equals_live_engine(ops: list[tuple[Any, ...]]) -> None:
    d = Driver()
    for op in ops:
        run(d, op)
    live = state(d.engine)
    back = restored(d.snapshot, unframe(d.after_snapshot))
    assert state(back) == live
    assert back.store.generation == d.recorded_generation
    assert back.check() == []
    # Records hold states, not deltas: the whole journal replayed over the snapshot agrees.
    if d.snapshot is not None:
        assert state(restored(d.snapshot, unframe(d.records))) == live


def small_journal() -> Driver:
    d = Driver()
    d.req(d.priv, Op.WRITE, b"/a/b\0one")
    d.req(d.priv, Op.INTRODUCE, b"5\x001\x007\0")
    d.req(d.priv, Op.SET_PERMS, b"/a/b\0n5\0r0\0")
    d.req(d.priv, Op.WRITE, b"/a/c\0two")
    return d


def test_torn_tail_at_every_offset_of_the_last_record_is_dropped() -> None:
    d = small_journal()
    whole = b"".join(d.records)
    last = len(d.records[-1])
    before = state(restored(None, unframe(d.records[:-1])))
    assert before != state(d.engine)
    for cut in range(len(whole) - last, len(whole)):
        payloads, end, problem = read_frames(whole[:cut])
        assert problem is not None or cut == len(whole) - last
        assert end == len(whole) - last
        assert state(restored(None, payloads)) == before
    payloads, end, problem = read_frames(whole)
    assert problem is None and end == len(whole)
    assert state(restored(None, payloads)) == state(d.engine)


def test_corrupt_byte_in_last_record_fails_its_checksum() -> None:
    d = small_journal()
    whole = bytearray(b"".join(d.records))
    start = len(whole) - len(d.records[-1])
    for i in range(start + FRAME_HEADER.size, len(whole)):
        bad = bytearray(whole)
        bad[i] ^= 0x40
        payloads, end, problem = read_frames(bytes(bad))
        assert end == start and problem is not None and "checksum" in problem
        assert len(payloads) == len(d.records) - 1


def test_oversized_length_is_a_torn_tail() -> None:
    body = msgpack.packb([1, []])
    good = frame(body)
    bad = FRAME_HEADER.pack(1 << 31, zlib.crc32(body)) + body
    payloads, end, problem = read_frames(good + bad)
    assert payloads == [body] and end == len(good) and problem is not None


def test_hole_of_zeros_ends_the_journal() -> None:
    """A crash may keep a later append and lose an earlier one: the lost one reads as zeros,
    whose header is an empty frame with a valid CRC.  Replay stops there, at a prefix."""
    d = small_journal()
    first, lost, *rest = d.records
    for hole in (len(lost), FRAME_HEADER.size, 3):
        data = first + bytes(hole) + b"".join(rest)
        payloads, end, problem = read_frames(data)
        assert end == len(first) and problem is not None
        assert state(restored(None, payloads)) == state(restored(None, unframe([first])))


def test_frame_round_trip() -> None:
    bodies = [b"\x90", b"x", bytes(range(256)) * 10]
    data = b"".join(frame(b) for b in bodies)
    payloads, end, problem = read_frames(data)
    assert payloads == bodies and problem is None and end == len(data)


def test_snapshot_carries_epoch_and_rejects_damage() -> None:
    d = small_journal()
    snap = d.journal.snapshot(7)
    assert load_snapshot(XenstoreEngine(), snap) == 7
    with pytest.raises(JournalError):
        load_snapshot(XenstoreEngine(), snap[:-1])
    other = msgpack.packb({"version": 99})
    with pytest.raises(JournalError):
        load_snapshot(XenstoreEngine(), frame(other))


def test_request_without_change_writes_no_record() -> None:
    d = Driver()
    d.req(d.priv, Op.WRITE, b"/x\0v")
    n = len(d.records)
    d.req(d.priv, Op.READ, b"/x\0")
    d.req(d.priv, Op.DIRECTORY, b"/\0")
    d.req(d.priv, Op.WRITE, b"bad")  # EINVAL: nothing changed
    assert len(d.records) == n


def test_quota_accounting_is_restored() -> None:
    d = Driver()
    d.req(d.priv, Op.INTRODUCE, b"5\x001\x007\0")
    d.req(d.priv, Op.MKDIR, b"/local/domain/5\0")
    d.req(d.priv, Op.SET_PERMS, b"/local/domain/5\0n5\0")
    g = d.guest(5)
    assert g is not None
    for i in range(3):
        assert d.req(g, Op.WRITE, b"k%d\0v" % i) == b"OK\0"
    back = restored(None, unframe(d.records))
    assert back.store.owned[5] == d.engine.store.owned[5] == 4

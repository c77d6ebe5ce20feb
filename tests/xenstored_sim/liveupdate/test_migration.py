"""The live-update state stream (core/migration.py): an engine rebuilt from it must behave
exactly like the one it was taken from, open transactions and watches included."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstored_sim.core import ConnKind, Quotas, XenstoreEngine, XsErrno
from xenstored_sim.core.migration import (
    ALREADY_ACTIVE,
    NOT_IN_SESSION,
    VERSION_UNSUPPORTED,
    ConnectionState,
    LiveUpdateControl,
    MigrationError,
    ShellState,
    StartRequest,
    build_stream,
    parse_stream,
    restore_engine,
)
from xenstored_sim.wire import Op, Packet

Msg = tuple[int, int, int, int, bytes]


def new_engine(quotas: Quotas | None = None) -> XenstoreEngine:
    return XenstoreEngine(quotas, audit=True, clock=lambda: 0.0)


def req(engine: XenstoreEngine, conn: int, op: Op, payload: bytes = b"", tx: int = 0) -> list[Msg]:
    box = engine.handle(conn, Packet(int(op), 7, tx, payload))
    return [(c, p.op, p.req_id, p.tx_id, p.payload) for c, p in box]


def reply(engine: XenstoreEngine, conn: int, op: Op, payload: bytes = b"", tx: int = 0) -> bytes:
    mine = [
        m for m in req(engine, conn, op, payload, tx) if m[0] == conn and m[1] != Op.WATCH_EVENT
    ]
    assert len(mine) == 1
    return mine[0][4]


def migrate(engine: XenstoreEngine, updates: int = 0) -> tuple[XenstoreEngine, ShellState]:
    conns = [ConnectionState(cid, 100 + cid, b"in%d" % cid, b"out%d" % cid) for cid in engine.conns]
    stream = build_stream(engine, ShellState(3, {1: 4}, conns, updates))
    fresh = new_engine()  # default quotas: the stream must bring the changed ones
    parsed = parse_stream(stream)
    restore_engine(fresh, parsed)
    return fresh, parsed.shell_state()


def tree(engine: XenstoreEngine) -> list[tuple[Any, ...]]:
    return [
        (path, n.value, n.perms, list(n.children), n.generation) for path, n in engine.store.walk()
    ]


def populated() -> tuple[XenstoreEngine, int, int, int]:
    """dom0 socket connection, a guest of domain 3 with a watch and an open transaction."""
    e = new_engine()
    priv = e.connect(ConnKind.SOCKET)
    assert reply(e, priv, Op.CONTROL, b"quota\0set\0nodes\0\x35\x30\0") == b"OK\0"
    assert reply(e, priv, Op.INTRODUCE, b"3\x001\x001\0") == b"OK\0"
    reply(e, priv, Op.MKDIR, b"/local/domain/3\0")
    reply(e, priv, Op.SET_PERMS, b"/local/domain/3\0n3\0")
    guest = e.connect(ConnKind.GUEST, 3)
    for i in range(5):
        assert reply(e, guest, Op.WRITE, b"n%d\0v%d" % (i, i)) == b"OK\0"
    assert reply(e, guest, Op.WATCH, b"n1\0rel\0") == b"OK\0"
    assert reply(e, guest, Op.WATCH, b"@releaseDomain\0rd\0") == b"OK\0"
    tx = int(reply(e, guest, Op.TRANSACTION_START, b"\0")[:-1])
    assert reply(e, guest, Op.WRITE, b"n1\0inside", tx) == b"OK\0"
    assert reply(e, guest, Op.RM, b"n2\0", tx) == b"OK\0"
    assert reply(e, guest, Op.READ, b"n4\0", tx) == b"v4"
    return e, priv, guest, tx


def test_store_domains_quotas_and_counters_survive() -> None:
    e, _, guest, tx = populated()
    m, shell = migrate(e, updates=4)
    assert tree(m) == tree(e)
    assert m.store.generation == e.store.generation
    assert m.store.owned == e.store.owned
    assert getattr(m.store, "memory", None) == getattr(e.store, "memory", None)
    assert m.quotas == e.quotas and m.quotas.nodes == 50
    assert {d: (x.port, x.target, x.conn_ids) for d, x in m.domains.items()} == {
        d: (x.port, x.target, x.conn_ids) for d, x in e.domains.items()
    }
    assert m.special_perms == e.special_perms
    assert m.domain_usage(3) == e.domain_usage(3)
    assert set(m.conns[guest].transactions) == {tx}
    assert shell.updates == 4 and shell.socket_fd == 3 and shell.guest_fds == {1: 4}
    assert [(c.conn_id, c.fd, c.unread, c.unsent) for c in shell.connections] == [
        (cid, 100 + cid, b"in%d" % cid, b"out%d" % cid) for cid in e.conns
    ]
    # New connections do not reuse an id.
    assert m.connect(ConnKind.SOCKET) == e.connect(ConnKind.SOCKET)


def test_continuation_matches_the_original() -> None:
    e, priv, guest, tx = populated()
    m, _ = migrate(e)
    script: list[tuple[int, Op, bytes, int]] = [
        (priv, Op.WRITE, b"/local/domain/3/n1\0outside", 0),  # the transaction read n1
        (guest, Op.WRITE, b"n5\0x", tx),
        (guest, Op.TRANSACTION_END, b"T\0", tx),  # EAGAIN: n1 changed under it
        (guest, Op.TRANSACTION_START, b"\0", 0),
        (priv, Op.DIRECTORY_PART, b"/local/domain/3\0\x30\0", 0),
        (priv, Op.RELEASE, b"3\0", 0),
        (priv, Op.WRITE, b"/after\0y", 0),
    ]
    for conn, op, payload, t in script:
        assert req(m, conn, op, payload, t) == req(e, conn, op, payload, t)
    assert tree(m) == tree(e)


def test_open_transaction_commits_after_migration() -> None:
    e, priv, guest, tx = populated()
    m, _ = migrate(e)
    assert reply(m, priv, Op.WRITE, b"/unrelated\0z") == b"OK\0"
    out = req(m, guest, Op.TRANSACTION_END, b"T\0", tx)
    assert out == req(e, guest, Op.TRANSACTION_END, b"T\0", tx)
    assert (guest, int(Op.WATCH_EVENT), 0, 0, b"n1\0rel\0") in out  # held-back event
    assert out[-1][4] == b"OK\0"
    assert reply(m, guest, Op.READ, b"n1\0") == b"inside"
    assert reply(m, guest, Op.READ, b"n2\0") == b"ENOENT\0"


def test_connection_left_out_loses_its_watches_and_transactions() -> None:
    e, priv, guest, _ = populated()
    conns = [ConnectionState(priv, 9)]
    fresh = new_engine()
    restore_engine(fresh, parse_stream(build_stream(e, ShellState(3, {}, conns))))
    assert set(fresh.conns) == {priv}
    assert fresh.watches.count(guest) == 0
    assert fresh.domains[3].conn_ids == set()


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda s: b"xenstorX" + s[8:], "not a xenstore"),
        (lambda s: s[:8] + struct.pack(">I", 2) + s[12:], "version not supported"),
        (lambda s: s[:8] + s[8:12] + struct.pack(">I", 1) + s[16:], "big-endian"),
        (lambda s: s[:-8], "runs past the end"),
        (lambda s: s[:10], "shorter than its header"),
        (lambda s: s[:16] + struct.pack("<II", 99, 0) + s[16:], "unknown record type 99"),
        (lambda s: s[:16] + struct.pack("<II", 3, 1) + b"\xc1" + b"\0" * 7 + s[16:], "type 3"),
    ],
)
def test_malformed_streams_are_refused(mangle: Any, problem: str) -> None:
    e, *_ = populated()
    stream = build_stream(e, ShellState(3, {}, []))
    with pytest.raises(MigrationError, match=problem):
        parse_stream(mangle(stream))


def test_stream_without_node_data_is_refused() -> None:
    header = b"xenstore" + struct.pack(">II", 1, 0)
    end = struct.pack("<II", 0, 0)
    with pytest.raises(MigrationError, match="lacks"):
        parse_stream(header + end)


def test_records_are_padded_to_eight_bytes() -> None:
    e, *_ = populated()
    stream = build_stream(e, ShellState(3, {}, [ConnectionState(c, c) for c in e.conns]))
    pos = 16
    kinds = []
    while True:
        kind, length = struct.unpack_from("<II", stream, pos)
        kinds.append(kind)
        assert pos % 8 == 0
        pos += 8 + length + (-length % 8)
        if kind == 0:
            break
    assert pos == len(stream)
    assert kinds[0] == 1 and kinds[-1] == 0 and {2, 3, 4, 5, 6} <= set(kinds)


# ---------------------------------------------------------------------- the control session


def test_control_session_answers_like_c() -> None:
    lu = LiveUpdateControl()
    assert lu.command(1, [b"-s"]) == NOT_IN_SESSION
    assert lu.command(1, [b"-a"]) == NOT_IN_SESSION
    assert lu.command(1, [b"-f", b"/usr/sbin/xenstored"]) == "OK"
    assert lu.command(2, [b"-f", b"/other"]) == ALREADY_ACTIVE
    assert lu.command(2, [b"-s"]) == NOT_IN_SESSION  # only the requester goes on
    assert lu.command(2, [b"-a"]) == NOT_IN_SESSION
    assert lu.command(1, [b"-c", b"--extra 1"]) == "OK"
    assert lu.command(1, [b"-s", b"-v", b"2"]) == VERSION_UNSUPPORTED
    assert lu.command(1, [b"-s", b"-t", b"5", b"-F"]) == StartRequest(
        "/usr/sbin/xenstored", "--extra 1", True, 5
    )
    assert "connection 1" in str(lu.command(1, []))
    assert lu.command(1, [b"-a"]) == "OK"
    assert lu.command(1, []) == "session: none\nupdates: 0\n"
    assert lu.command(1, [b"-c", b"x"]) == "OK"  # -c opens a session of its own
    assert lu.command(1, [b"-s"]) == StartRequest(None, "x", False, 60)


@pytest.mark.parametrize(
    "args",
    [
        [b"-f"],
        [b"-f", b""],
        [b"-c"],
        [b"-a", b"x"],
        [b"-s", b"-t"],
        [b"-s", b"-t", b"x"],
        [b"-s", b"-q"],
        [b"-z"],
    ],
)
def test_control_session_bad_arguments_are_einval(args: list[bytes]) -> None:
    lu = LiveUpdateControl()
    lu.command(1, [b"-f", b"/bin/true"]) if args[0] != b"-f" else None
    with pytest.raises(XsErrno) as exc:
        lu.command(1, args)
    assert exc.value.errno_name == "EINVAL"


# -------------------------------------------------------------------------------- property

_PATHS = [b"a", b"a/b", b"c", b"/local/domain/3/a", b"/x"]
_request = st.tuples(
    st.sampled_from([0, 1]),  # privileged connection, guest connection
    st.sampled_from(["write", "rm", "read", "start", "commit", "abort", "watch", "dirpart"]),
    st.sampled_from(_PATHS),
    st.booleans(),  # inside the connection's open transaction, if any
)


def _apply(e: XenstoreEngine, conns: list[int], step: tuple[int, str, bytes, bool]) -> list[Msg]:
    who, kind, path, in_tx = step
    conn = conns[who]
    open_tx = sorted(e.conns[conn].transactions)
    tx = open_tx[0] if (in_tx or kind in ("commit", "abort")) and open_tx else 0
    if kind == "write":
        return req(e, conn, Op.WRITE, path + b"\0v", tx)
    if kind == "rm":
        return req(e, conn, Op.RM, path + b"\0", tx)
    if kind == "read":
        return req(e, conn, Op.READ, path + b"\0", tx)
    if kind == "start":
        return req(e, conn, Op.TRANSACTION_START, b"\0")
    if kind in ("commit", "abort"):
        return req(e, conn, Op.TRANSACTION_END, b"T\0" if kind == "commit" else b"F\0", tx)
    if kind == "watch":
        return req(e, conn, Op.WATCH, path + b"\0t\0")
    return req(e, conn, Op.DIRECTORY_PART, path + b"\0" + b"0\0", tx)


@settings(max_examples=60, deadline=None)
@given(st.lists(_request, max_size=25), st.lists(_request, max_size=25))
def test_migration_is_invisible(before: list[Any], after: list[Any]) -> None:
    """Whatever happened before, an update changes nothing clients can see afterwards."""
    e = new_engine()
    priv = e.connect(ConnKind.SOCKET)
    reply(e, priv, Op.INTRODUCE, b"3\x001\x001\0")
    reply(e, priv, Op.MKDIR, b"/local/domain/3\0")
    reply(e, priv, Op.SET_PERMS, b"/local/domain/3\0n3\0")
    conns = [priv, e.connect(ConnKind.GUEST, 3)]
    for step in before:
        _apply(e, conns, step)
    m, _ = migrate(e)
    for step in after:
        assert _apply(m, conns, step) == _apply(e, conns, step)
    assert tree(m) == tree(e)
    assert m.store.generation == e.store.generation

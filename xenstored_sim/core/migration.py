"""The live-update state stream: the engine's whole state as records (no I/O).

Theory of operation.  ``xenstore-control live-update`` makes the daemon re-execute itself;
everything clients can observe must reach the new process.  :func:`build_stream` turns the
engine, plus what the I/O shell knows (the descriptors of the listening and client sockets,
each connection's unread input and unsent output), into one byte string, and
:func:`parse_stream` and :func:`restore_engine` rebuild it on the other side.

Framing follows Xen's ``docs/designs/xenstore-migration.md`` (xenstore-facts.md §8.3): the
header is the 8 bytes ``xenstore``, a version and flags (both u32 big-endian; flags bit 0
would mark big-endian records, and this stream is little-endian), then records of ``type``
and ``len`` (u32 each) whose bodies are padded to 8 bytes, ending with END.  The record types
keep Xen's numbers, but the bodies are msgpack, not Xen's binary layouts, so the stream is
not interchangeable with C xenstored's:

GLOBAL_DATA
    the privileged listener's descriptor, the guest listeners' descriptors by domid, and the
    live-update count.
CONNECTION_DATA
    one per connection: id, kind, domid, target, socket descriptor, audit peer, next
    transaction id, and the unread input and unsent output bytes.
WATCH_DATA
    one per watch, in registration order: connection, path, token, relative flag.
TRANSACTION_DATA
    one per open transaction: its private copies of the nodes it touched, the generations
    it recorded, its modified paths in order, its held-back watch events, the failed flag
    and the per-owner node deltas.  C xenstored does not carry transactions over (§8.3);
    this daemon does, so a client may commit a transaction it opened before the update.
NODE_DATA
    one record holding :meth:`Journal.snapshot <.journal.Journal.snapshot>` of the store:
    nodes with generations, the generation counter, the domain table and the special
    names' permissions (the domains are therefore not a separate DOMAIN_DATA record).
GLOBAL_QUOTA_DATA
    the quota settings, which CONTROL ``quota set`` may have changed since start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, Final

import msgpack

from .domains import Connection, ConnKind
from .engine import XenstoreEngine
from .errors import XsErrno
from .journal import Journal, NodeTracker, _node_from, _node_state, load_snapshot, recount
from .perms import Perms
from .store import Node
from .transactions import Transaction, TxEvent

MAGIC: Final = b"xenstore"
#: Version of this daemon's stream (its bodies are msgpack, see the module docstring).
STREAM_VERSION: Final = 1
_HEADER: Final = struct.Struct(">8sII")
_RECORD: Final = struct.Struct("<II")

# Record types of xenstore-migration.md.
END: Final = 0
GLOBAL_DATA: Final = 1
CONNECTION_DATA: Final = 2
WATCH_DATA: Final = 3
TRANSACTION_DATA: Final = 4
NODE_DATA: Final = 5
GLOBAL_QUOTA_DATA: Final = 6
_KINDS: Final = frozenset(
    {END, GLOBAL_DATA, CONNECTION_DATA, WATCH_DATA, TRANSACTION_DATA, NODE_DATA, GLOBAL_QUOTA_DATA}
)


class MigrationError(Exception):
    """A state stream is malformed."""


@dataclass
class ConnectionState:
    """What the I/O shell holds for one connection."""

    conn_id: int
    fd: int
    #: bytes received but not yet handled (a request waiting for room, then the rest)
    unread: bytes = b""
    #: bytes queued but not yet sent (replies, watch events, the requester's ``OK``)
    unsent: bytes = b""


@dataclass
class ShellState:
    """The I/O side of a live update: descriptors and the bytes in flight."""

    socket_fd: int
    #: domid -> descriptor of ``RUNDIR/domains/<domid>.sock``
    guest_fds: dict[int, int] = field(default_factory=dict)
    connections: list[ConnectionState] = field(default_factory=list)
    #: how many live updates this daemon has been through
    updates: int = 0
    #: principal -> descriptor of its own privileged socket (``--principal-socket``)
    principal_fds: dict[str, int] = field(default_factory=dict)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def _record(kind: int, body: bytes) -> bytes:
    pad = -len(body) % 8
    return _RECORD.pack(kind, len(body)) + body + b"\0" * pad


def _flat(perms: Perms | None) -> list[int] | None:
    return None if perms is None else [x for entry in perms for x in entry]


def _perms(flat: list[int] | None) -> Perms | None:
    if flat is None:
        return None
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def _opt_node(node: Node | None) -> list[Any] | None:
    return None if node is None else _node_state(node)


def _slots(obj: object) -> tuple[str, ...]:
    """The attribute names of ``obj``'s class, in order: its ``__slots__``, or for a class
    compiled with mypyc (xenstored_sim/compiled.py), which has none, ``__mypyc_attrs__``."""
    cls = type(obj)
    names: tuple[str, ...] | None = getattr(cls, "__slots__", None)
    if names is None:
        names = getattr(cls, "__mypyc_attrs__", ())
    return tuple(sorted(names or ()))


def _scalars(obj: object, handled: frozenset[str]) -> dict[str, int]:
    """The integer and flag slots of ``obj`` not serialised field by field (accounting
    counters), so that counters added to the engine's classes are carried over too."""
    found: dict[str, int] = {}
    for name in _slots(obj):
        value = getattr(obj, name, None)
        if name not in handled and isinstance(value, int):  # bool is an int too
            found[name] = value
    return found


def _set_scalars(obj: object, values: dict[str, int]) -> None:
    slots = _slots(obj)
    for name, value in values.items():
        if name in slots:
            setattr(obj, name, value)


_TXN_FIELDS: Final = frozenset(
    {"conn_id", "id", "domid", "node_limit", "nodes", "recorded", "modified", "events"}
    | {"failed", "owned_delta"}
)
_CONN_FIELDS: Final = frozenset(
    {"id", "kind", "domid", "target", "peer", "next_tx", "privileged", "implicit"}
)


def _store_snapshot(engine: XenstoreEngine) -> bytes:
    """The journal's snapshot of the store, without leaving a tracker behind."""
    nodes = engine.store.nodes
    snapshot = Journal(engine).snapshot(0)
    if not isinstance(nodes, NodeTracker):
        engine.store.nodes = nodes  # the snapshot copied the plain dict into a tracker
    return snapshot


def _transaction_state(txn: Transaction) -> dict[str, Any]:
    events = []
    for ev in txn.events.values():
        # An event usually refers to the transaction's own copy of its node: keep that link,
        # so later changes inside the transaction still reach the event (its perms decide
        # who may see it at commit).
        shared = ev.node is not None and txn.nodes.get(ev.path) is ev.node
        node = None if shared else _opt_node(ev.node)
        events.append([ev.path, shared, node, ev.exact, _flat(ev.old_perms)])
    return {
        "conn": txn.conn_id,
        "id": txn.id,
        "domid": txn.domid,
        "limit": txn.node_limit,
        # with each private copy's memory charge (Node.acc where the engine keeps one)
        "nodes": [[p, _opt_node(n), getattr(n, "acc", 0)] for p, n in txn.nodes.items()],
        "recorded": [[p, g] for p, g in txn.recorded.items()],
        "modified": list(txn.modified),
        "events": events,
        "failed": txn.failed,
        "owned": [[d, n] for d, n in txn.owned_delta.items()],
        "extra": _scalars(txn, _TXN_FIELDS),
    }


def _transaction_from(state: dict[str, Any]) -> Transaction:
    txn = Transaction(state["id"], state["conn"], state["domid"], state["limit"])
    txn.nodes = {}
    for path, node_state, acc in state["nodes"]:
        node = None if node_state is None else _node_from(node_state)
        if node is not None and acc:
            _set_scalars(node, {"acc": acc})
        txn.nodes[path] = node
    txn.recorded = {p: g for p, g in state["recorded"]}
    txn.modified = dict.fromkeys(state["modified"])
    for path, shared, node, exact, old in state["events"]:
        ev_node = txn.nodes.get(path) if shared else (None if node is None else _node_from(node))
        txn.events[path] = TxEvent(path, ev_node, exact, _perms(old))
    txn.failed = state["failed"]
    txn.owned_delta = {d: n for d, n in state["owned"]}
    _set_scalars(txn, state["extra"])
    return txn


def build_stream(engine: XenstoreEngine, shell: ShellState) -> bytes:
    """Serialise the engine and the shell's connections.

    Only the connections in ``shell.connections`` are carried over, with their watches and
    transactions; any other engine connection is left behind.
    """
    out = [_HEADER.pack(MAGIC, STREAM_VERSION, 0)]
    glob = {
        "socket": shell.socket_fd,
        "guests": [[d, fd] for d, fd in shell.guest_fds.items()],
        "principals": [[name, fd] for name, fd in shell.principal_fds.items()],
        "updates": shell.updates,
    }
    out.append(_record(GLOBAL_DATA, _pack(glob)))
    out.append(
        _record(
            GLOBAL_QUOTA_DATA,
            _pack({f.name: getattr(engine.quotas, f.name) for f in fields(engine.quotas)}),
        )
    )
    out.append(_record(NODE_DATA, _store_snapshot(engine)))
    kept: set[int] = set()
    for cs in shell.connections:
        conn = engine.conns.get(cs.conn_id)
        if conn is None:
            continue
        kept.add(conn.id)
        body = {
            "id": conn.id,
            "kind": conn.kind.value,
            "domid": conn.domid,
            "target": conn.target,
            "fd": cs.fd,
            "peer": conn.peer,
            "next_tx": conn.next_tx,
            "extra": _scalars(conn, _CONN_FIELDS),
            "unread": cs.unread,
            "unsent": cs.unsent,
        }
        out.append(_record(CONNECTION_DATA, _pack(body)))
    watches = [w for cid in sorted(kept) for w in engine.watches.of_conn(cid)]
    watches.sort(key=lambda w: w.seq)  # registration order decides delivery order
    for w in watches:
        out.append(_record(WATCH_DATA, _pack([w.conn_id, w.path, w.token, w.relative])))
    for cid in sorted(kept):
        for txn in engine.conns[cid].transactions.values():
            out.append(_record(TRANSACTION_DATA, _pack(_transaction_state(txn))))
    out.append(_record(END, b""))
    return b"".join(out)


@dataclass
class ParsedStream:
    """The records of a stream, grouped by type."""

    glob: dict[str, Any]
    quotas: dict[str, int]
    snapshot: bytes
    connections: list[dict[str, Any]]
    watches: list[list[Any]]
    transactions: list[dict[str, Any]]

    def shell_state(self) -> ShellState:
        """The descriptors and bytes in flight, for the I/O shell."""
        return ShellState(
            socket_fd=self.glob["socket"],
            guest_fds={d: fd for d, fd in self.glob["guests"]},
            principal_fds={name: fd for name, fd in self.glob.get("principals", [])},
            connections=[
                ConnectionState(c["id"], c["fd"], c["unread"], c["unsent"])
                for c in self.connections
            ],
            updates=self.glob["updates"],
        )


def parse_stream(data: bytes) -> ParsedStream:
    """Split a stream into its records; MigrationError if it is malformed."""
    if len(data) < _HEADER.size:
        raise MigrationError("stream shorter than its header")
    magic, version, flags = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MigrationError("not a xenstore state stream")
    if version != STREAM_VERSION:
        raise MigrationError("Migration stream version not supported.")
    if flags & 1:
        raise MigrationError("big-endian records are not supported")
    pos = _HEADER.size
    parsed = ParsedStream({}, {}, b"", [], [], [])
    seen_global = seen_nodes = False
    while True:
        if pos + _RECORD.size > len(data):
            raise MigrationError(f"record header at {pos} runs past the end")
        kind, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + length > len(data):
            raise MigrationError(f"record at {pos} runs past the end")
        body = data[pos : pos + length]
        pos += length + (-length % 8)
        if kind == END:
            break
        if kind not in _KINDS:
            raise MigrationError(f"unknown record type {kind}")
        if kind == NODE_DATA:
            parsed.snapshot = body
            seen_nodes = True
            continue
        try:
            value = _unpack(body)
        except (ValueError, msgpack.UnpackException) as exc:
            raise MigrationError(f"record of type {kind}: {exc}") from exc
        if kind == GLOBAL_DATA:
            parsed.glob = value
            seen_global = True
        elif kind == GLOBAL_QUOTA_DATA:
            parsed.quotas = value
        elif kind == CONNECTION_DATA:
            parsed.connections.append(value)
        elif kind == WATCH_DATA:
            parsed.watches.append(value)
        else:
            parsed.transactions.append(value)
    if not (seen_global and seen_nodes):
        raise MigrationError("stream lacks GLOBAL_DATA or NODE_DATA")
    return parsed


def restore_engine(engine: XenstoreEngine, parsed: ParsedStream) -> None:
    """Load a parsed stream into a fresh engine: store, domains, quotas, connections,
    watches and transactions.  The store replaces whatever the engine held."""
    for name, value in parsed.quotas.items():
        setattr(engine.quotas, name, value)
    load_snapshot(engine, parsed.snapshot)
    recount(engine.store)
    top = 0
    for c in parsed.connections:
        kind = ConnKind(c["kind"])
        conn = Connection(c["id"], kind, c["domid"], c["peer"])
        conn.target = c["target"]
        conn.next_tx = c["next_tx"]
        _set_scalars(conn, c["extra"])
        if kind is ConnKind.GUEST:
            dom = engine.domains.get(conn.domid)
            if dom is None:
                raise MigrationError(f"connection {conn.id} of unknown domain {conn.domid}")
            dom.conn_ids.add(conn.id)
        engine.conns[conn.id] = conn
        top = max(top, conn.id)
    engine._next_conn = max(engine._next_conn, top + 1)
    for conn_id, path, token, relative in parsed.watches:
        if conn_id not in engine.conns:
            raise MigrationError(f"watch of unknown connection {conn_id}")
        engine.watches.add(conn_id, path, token, relative)
    for state in parsed.transactions:
        txn = _transaction_from(state)
        owner = engine.conns.get(txn.conn_id)
        if owner is None:
            raise MigrationError(f"transaction of unknown connection {txn.conn_id}")
        owner.transactions[txn.id] = txn


# ------------------------------------------------------------------------ the control session

NOT_IN_SESSION: Final = "Not in live-update session."
ALREADY_ACTIVE: Final = "live-update session already active."
VERSION_UNSUPPORTED: Final = "Migration stream version not supported."
EXEC_FAILED: Final = "Error activating new binary."


@dataclass
class StartRequest:
    """A valid ``live-update -s``: the shell serialises and re-executes."""

    binary: str | None
    cmdline: str | None
    force: bool
    timeout: int


@dataclass
class LiveUpdateSession:
    """The session C's ``lu_begin`` opens: only its requester may go on with it."""

    conn_id: int
    binary: str | None = None
    cmdline: str | None = None


class LiveUpdateControl:
    """CONTROL ``live-update`` sub-commands as C answers them (xenstore-facts.md §8.2; C
    lu.c, lu_daemon.c).  :meth:`command` returns the reply text, or a :class:`StartRequest`
    the shell carries out; ``XsErrno("EINVAL")`` for malformed arguments.

    Without arguments it answers a status text (C has no such query): the session and the
    number of live updates this daemon has been through, which a client can compare across
    an update.
    """

    def __init__(self, updates: int = 0) -> None:
        self.session: LiveUpdateSession | None = None
        #: completed live updates since the daemon was first started
        self.updates = updates

    def status(self) -> str:
        if self.session is None:
            state = "none"
        else:
            state = f"connection {self.session.conn_id}, binary {self.session.binary or '-'}"
        return f"session: {state}\nupdates: {self.updates}\n"

    def command(self, conn_id: int, args: list[bytes]) -> str | StartRequest:
        if not args:
            return self.status()
        sub, rest = args[0], [a.decode("utf-8", "surrogateescape") for a in args[1:]]
        session = self.session
        mine = session is not None and session.conn_id == conn_id
        if sub == b"-f":
            if len(rest) != 1 or not rest[0]:
                raise XsErrno("EINVAL")
            if session is not None:
                return ALREADY_ACTIVE
            self.session = LiveUpdateSession(conn_id, binary=rest[0])
            return "OK"
        if sub == b"-c":
            if len(rest) != 1:
                raise XsErrno("EINVAL")
            if session is None:
                # C lets -c open the session too (lu_begin)
                self.session = session = LiveUpdateSession(conn_id)
            elif not mine:
                return ALREADY_ACTIVE
            session.cmdline = rest[0]
            return "OK"
        if sub == b"-a":
            if rest:
                raise XsErrno("EINVAL")
            if not mine:
                return NOT_IN_SESSION
            self.session = None
            return "OK"
        if sub == b"-s":
            force = False
            timeout = 60
            it = iter(rest)
            for arg in it:
                if arg == "-F":
                    force = True
                elif arg == "-t":
                    value = next(it, None)
                    if value is None or not value.isdigit():
                        raise XsErrno("EINVAL")
                    timeout = int(value)
                elif arg == "-v":
                    value = next(it, None)
                    if value is None or not value.isdigit():
                        raise XsErrno("EINVAL")
                    if int(value) != STREAM_VERSION:
                        return VERSION_UNSUPPORTED
                else:
                    raise XsErrno("EINVAL")
            if not mine:
                return NOT_IN_SESSION
            assert session is not None
            return StartRequest(session.binary, session.cmdline, force, timeout)
        raise XsErrno("EINVAL")

"""Journal records and snapshots of the durable store, in msgpack (no I/O).

Theory of operation.  With durability on, the engine's node dict is a :class:`NodeTracker`:
every node a request creates, changes or deletes passes through ``nodes[path] = node`` or
``del nodes[path]`` (the engine stamps each change with a generation there), so the tracker
learns the paths a request touched without a hook on the request path.  After a request the
shell calls :meth:`Journal.record`, which turns those paths into one record holding the
*whole* new state of each touched node (value, permissions, children in order, generation) or
its deletion, the global generation counter and, for the domain operations, the whole domain
table and the permissions of the special names.  Because records carry states rather than
deltas, replaying a record twice gives the same store, and a snapshot holds the same state as
the records that led to it.

Framing: every record and every snapshot is ``length (u32 LE) | crc32 (u32 LE) | msgpack``.
:func:`read_frames` stops at the first frame that is short, over-long, empty or fails its CRC:
that is a torn tail (a write cut by a crash, or a hole of zeros where an un-synced append was
lost while a later one reached the disk: a zero header is an empty frame with a valid CRC), and
everything from there on is dropped, so what is replayed is always a prefix of the records.

Not recorded: connections, watches and open transactions (they die with their connections),
quota limits (they come from the command line at each start).  Per-owner node counts are
recomputed from the restored nodes.  A TRANSACTION_START advances the generation counter
without a record; the next record carries the counter, and a restored counter is never below
a restored node's generation.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import Any, Final

import msgpack

from ..wire import Op
from .domains import Domain
from .engine import XenstoreEngine
from .store import Node, Store

#: Journal format version, checked on snapshot load.
FORMAT_VERSION: Final = 1
FRAME_HEADER: Final = struct.Struct("<II")
#: A frame longer than this is treated as corruption, not as a record.
FRAME_MAX: Final = 1 << 30


_DOMAIN_OPS: Final = frozenset({int(Op.INTRODUCE), int(Op.RELEASE), int(Op.SET_TARGET)})
_SET_PERMS: Final = int(Op.SET_PERMS)


def touches_domains(op: int, payload: bytes) -> bool:
    """Whether a request may change the domain table or the special names' permissions,
    so its record must carry them (``with_domains`` of :meth:`Journal.record`)."""
    return op in _DOMAIN_OPS or (op == _SET_PERMS and payload[:1] == b"@")


class JournalError(Exception):
    """A snapshot is unreadable (bad CRC, unknown version)."""


class NodeTracker(dict[str, Node]):
    """The store's node dict, noting every path assigned or deleted since :meth:`take`."""

    __slots__ = ("dirty",)

    def __init__(self, nodes: dict[str, Node]) -> None:
        super().__init__(nodes)
        self.dirty: dict[str, None] = {}

    def __setitem__(self, path: str, node: Node) -> None:
        self.dirty[path] = None
        super().__setitem__(path, node)

    def __delitem__(self, path: str) -> None:
        self.dirty[path] = None
        super().__delitem__(path)

    def pop(self, path: str, *default: Any) -> Any:
        self.dirty[path] = None
        return super().pop(path, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        other = dict(*args, **kwargs)
        self.dirty.update(dict.fromkeys(other))
        super().update(other)

    def take(self) -> list[str]:
        paths = list(self.dirty)
        self.dirty.clear()
        return paths


def frame(payload: bytes) -> bytes:
    """One length + CRC32 framed record."""
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes) -> tuple[list[bytes], int, str | None]:
    """Split a journal into payloads.

    Returns ``(payloads, good_end, problem)``: ``good_end`` is the offset just after the last
    whole, CRC-valid frame, and ``problem`` says why reading stopped early (None if the data
    ended exactly on a frame boundary).
    """
    payloads: list[bytes] = []
    pos = 0
    end = len(data)
    view = memoryview(data)
    hsize = FRAME_HEADER.size
    while pos < end:
        if end - pos < hsize:
            return payloads, pos, f"partial header at offset {pos}"
        length, crc = FRAME_HEADER.unpack_from(data, pos)
        if length == 0:
            # Never written (every record and snapshot is non-empty msgpack), but what a
            # hole reads as: zeros where a crash lost an append that a later one overtook.
            return payloads, pos, f"empty record (a hole of zeros) at offset {pos}"
        if length > FRAME_MAX or pos + hsize + length > end:
            return payloads, pos, f"record at offset {pos} runs past the end"
        payload = bytes(view[pos + hsize : pos + hsize + length])
        if zlib.crc32(payload) != crc:
            return payloads, pos, f"bad checksum at offset {pos}"
        payloads.append(payload)
        pos += hsize + length
    return payloads, pos, None


def _node_state(node: Node) -> list[Any]:
    return [
        node.value,
        [x for entry in node.perms for x in entry],
        list(node.children),
        node.generation,
    ]


def _node_from(state: list[Any]) -> Node:
    value, flat, children, generation = state
    perms = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    node = Node(value, perms, dict.fromkeys(map(sys.intern, children)))
    node.generation = generation
    return node


def _domains_state(domains: dict[int, Domain]) -> list[list[Any]]:
    return [[d.domid, d.port, d.target] for d in domains.values()]


def _special_state(special: dict[str, Any]) -> dict[str, list[int]]:
    return {name: [x for entry in perms for x in entry] for name, perms in special.items()}


def _perms_from(flat: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


class Journal:
    """Builds records from a tracked engine and snapshots of its whole state.

    Creating a Journal installs the :class:`NodeTracker` in the engine's store.
    """

    def __init__(self, engine: XenstoreEngine) -> None:
        self.engine = engine
        store: Store = engine.store
        if not isinstance(store.nodes, NodeTracker):
            store.nodes = NodeTracker(store.nodes)
        self.tracker: NodeTracker = store.nodes

    def record(self, with_domains: bool) -> bytes | None:
        """The framed record of what changed since the last call, or None if nothing did."""
        tracker = self.tracker
        if not tracker.dirty and not with_domains:
            return None
        changes = []
        for path in tracker.take():
            node = tracker.get(path)
            changes.append([path, None if node is None else _node_state(node)])
        engine = self.engine
        rec: list[Any] = [engine.store.generation, changes]
        if with_domains:
            rec.append(_domains_state(engine.domains))
            rec.append(_special_state(engine.special_perms))
        return frame(msgpack.packb(rec, use_bin_type=True))

    def snapshot(self, epoch: int) -> bytes:
        """The framed snapshot of the whole durable state, naming the journal that follows
        it (``epoch``); pending changes are forgotten, the snapshot holds them."""
        engine = self.engine
        self.tracker.dirty.clear()
        store: Store = engine.store
        state = {
            "version": FORMAT_VERSION,
            "epoch": epoch,
            "generation": store.generation,
            "nodes": [[path, *_node_state(node)] for path, node in store.nodes.items()],
            "domains": _domains_state(engine.domains),
            "special": _special_state(engine.special_perms),
        }
        return frame(msgpack.packb(state, use_bin_type=True))


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def load_snapshot(engine: XenstoreEngine, data: bytes) -> int:
    """Replace the engine's store, domains and special permissions with a snapshot's;
    returns the snapshot's epoch (the number of the journal that follows it)."""
    payloads, _, problem = read_frames(data)
    if problem is not None or len(payloads) != 1:
        raise JournalError(problem or "snapshot is not one record")
    state = _unpack(payloads[0])
    if state.get("version") != FORMAT_VERSION:
        raise JournalError(f"unknown snapshot version {state.get('version')!r}")
    store: Store = engine.store
    store.nodes.clear()
    for path, *node in state["nodes"]:
        dict.__setitem__(store.nodes, path, _node_from(node))
    store.generation = state["generation"]
    _restore_domains(engine, state["domains"], state["special"])
    return int(state["epoch"])


def _restore_domains(
    engine: XenstoreEngine, domains: list[list[Any]], special: dict[str, list[int]]
) -> None:
    engine.domains.clear()
    for domid, port, target in domains:
        dom = Domain(domid, port)
        dom.target = target
        engine.domains[domid] = dom
    engine.special_perms.update({name: _perms_from(flat) for name, flat in special.items()})


def apply_records(engine: XenstoreEngine, payloads: list[bytes]) -> None:
    """Replay journal records (unframed payloads) onto the engine, then recount owners."""
    store: Store = engine.store
    nodes = store.nodes
    for payload in payloads:
        rec = _unpack(payload)
        generation, changes = rec[0], rec[1]
        for path, node in changes:
            if node is None:
                dict.pop(nodes, path, None)
            else:
                dict.__setitem__(nodes, path, _node_from(node))
        store.generation = max(store.generation, generation)
        if len(rec) > 2:
            _restore_domains(engine, rec[2], rec[3])
    recount(store)


def recount(store: Store) -> None:
    """Recompute the per-owner node counts and memory (the ``nodes`` and ``memory`` quotas)."""
    owned: dict[int, int] = {}
    top = 0
    for node in store.nodes.values():
        owner = node.perms[0][1]
        owned[owner] = owned.get(owner, 0) + 1
        top = max(top, node.generation)
    store.owned = owned
    store.generation = max(store.generation, top + 1)
    store.recount_memory()

"""The xenstore daemon as a pure state machine.

Theory of operation.  :class:`XenstoreEngine` holds the store, the connections, watches,
transactions and domains.  The I/O shell calls :meth:`~XenstoreEngine.connect` for each new
client, :meth:`~XenstoreEngine.handle` for each request, and
:meth:`~XenstoreEngine.disconnect` when a client goes away.  ``handle`` returns an
:class:`Outbox`: every message the request causes, in the order C xenstored queues them, as
``(conn_id, Packet)`` pairs.  The shell only routes them.

Ordering (xenstore-facts.md §1.13): watch events caused by a request are queued before its
reply, also for the requester's own watches; the first event of a new WATCH follows its OK.

Request processing follows C's ``process_message`` (§1.12): an unknown type is ENOSYS, a
privileged-only type from a guest is EACCES, a non-zero unknown transaction id is ENOENT
(WATCH and UNWATCH ignore the id), then the handler runs.  A reply over 4096 bytes becomes
E2BIG (XSA-72); an event over 4096 bytes is dropped (XSA-324).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn

from mypy_extensions import mypyc_attr

from ..wire import DOMID_SELF, HEADER, PAYLOAD_MAX, REL_PATH_MAX, Op, Packet
from . import control
from .domains import Connection, ConnKind, Domain
from .errors import XsErrno
from .paths import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    basename,
    canonicalize,
    child_path,
    parent_of,
)
from .perms import (
    DEFAULT_PERMS,
    LETTERS,
    PERM_ALL,
    PERM_BOTH,
    PERM_IGNORE,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    Perms,
    entry_string,
    format_perms,
    parse_perms,
)
from .quotas import Quotas
from .store import NO_GENERATION, NODE_HEADER_SIZE, PERM_ENTRY_SIZE, Node, Store
from .transactions import Transaction, TxEvent
from .watches import WatchRegistry

OK: Final = b"OK\0"
_WATCH_EVENT: Final = int(Op.WATCH_EVENT)
_ERROR: Final = int(Op.ERROR)

#: Types only a privileged connection may send (C ``process_message``; XSA-115 added
#: IS_DOMAIN_INTRODUCED).
PRIVILEGED_OPS: Final = frozenset(
    {Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET}
)
# WATCH and UNWATCH ignore tx_id since the XSA-115 fix (§4.1).
_TX_FREE: Final = frozenset({int(Op.WATCH), int(Op.UNWATCH)})
# Errors that fail the enclosing transaction, whose commit then answers ENOMEM (§5.3); EIO is
# a node write over the memory quota (C ``write_node`` fails the transaction).
_TX_FAILING: Final = frozenset({"ENOSPC", "ENOMEM", "EIO"})
# Replies up to this size use C's built-in buffer and are never refused for memory.
_REPLY_BUFFER: Final = 16
#: ``DOMID_FIRST_RESERVED`` (xen/include/public/xen.h): ids from here on name no domain.
DOMID_FIRST_RESERVED: Final = 0x7FF0
_log = logging.getLogger("xenstored_sim")
_ATOI: Final = re.compile(rb"\s*([+-]?[0-9]+)")
_ERRNO_PAYLOAD: dict[str, bytes] = {}

Handler = Callable[[Connection, Packet, "Transaction | None", "Outbox"], bytes]


@mypyc_attr(native_class=False)  # compiled classes cannot extend list
class Outbox(list[tuple[int, Packet]]):
    """Messages to send, in order, plus domain changes the I/O shell must act on."""

    __slots__ = ("closed", "introduced", "released")

    def __init__(self) -> None:
        # Tuples: empty on almost every request, so nothing is allocated for them.
        #: domids whose guest socket must be opened
        self.introduced: tuple[int, ...] = ()
        #: domids whose guest socket must be closed
        self.released: tuple[int, ...] = ()
        #: connections the engine has dropped (RELEASE of their domain); close them
        self.closed: tuple[int, ...] = ()


def _errno_payload(errno: str) -> bytes:
    payload = _ERRNO_PAYLOAD.get(errno)
    if payload is None:
        payload = _ERRNO_PAYLOAD[errno] = errno.encode() + b"\0"
    return payload


def _onearg(payload: bytes) -> bytes:
    """C ``onearg``: exactly one NUL, and it ends the payload; else EINVAL (§1.6)."""
    n = len(payload)
    if n == 0 or payload[-1] != 0 or payload.find(b"\0") != n - 1:
        raise XsErrno("EINVAL")
    return payload[:-1]


def _c_strings(payload: bytes) -> list[bytes]:
    """C get_strings(): the NUL-terminated strings; an unterminated tail does not count."""
    return payload.split(b"\0")[: payload.count(b"\0")]


def _two_strings(payload: bytes) -> tuple[bytes, bytes]:
    """Exactly two NUL-terminated strings (C do_watch(), do_unwatch()), else EINVAL."""
    args = _c_strings(payload)
    if len(args) != 2:
        raise XsErrno("EINVAL")
    return args[0], args[1]


def _nothing_unsent(conn_id: int) -> int:
    return 0


def atoi(raw: bytes) -> int:
    """C ``atoi``: leading blanks, a sign, digits; anything else stops it (0 if none)."""
    m = _ATOI.match(raw)
    return int(m.group(1)) if m else 0


class XenstoreEngine:
    """A C-xenstored-4.17-compatible xenstore daemon without I/O.

    Args:
        quotas: the quota settings (C 4.17 defaults if omitted).
        audit: keep one audit record per request in :attr:`audit` for the shell to drain.
        clock: the time source of audit records.
    """

    def __init__(
        self,
        quotas: Quotas | None = None,
        *,
        audit: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = Store()
        self.quotas = quotas if quotas is not None else Quotas()
        self.watches = WatchRegistry()
        self.domains: dict[int, Domain] = {}
        # 4.17 keeps the special names' permissions apart from the tree (§2.6).
        self.special_perms: dict[str, Perms] = {
            INTRODUCE_DOMAIN: DEFAULT_PERMS,
            RELEASE_DOMAIN: DEFAULT_PERMS,
        }
        self.conns: dict[int, Connection] = {}
        self._next_conn = 1
        #: How many messages the shell holds unsent for a connection (CONTROL ``quota
        #: <domid>`` reports the sum over a domain's connections as ``outstanding``).
        self.unsent: Callable[[int], int] = _nothing_unsent
        #: C -K/--keep-orphans: RELEASE gives the domain's nodes to dom0 instead.
        self.keep_orphans = False
        #: audit records not yet taken by the shell (None when auditing is off)
        self.audit: list[dict[str, Any]] | None = [] if audit else None
        self._clock = clock
        # per-request scratch for the audit record and the WATCH's first event
        self._rule: str | None = None
        self._apath: str | None = None
        self._apaths: list[str] | None = None
        self._aargs: list[str] | None = None
        self._after: tuple[int, Packet] | None = None
        self._handlers: dict[int, Handler] = {
            Op.CONTROL: self._op_control,
            Op.DIRECTORY: self._op_directory,
            Op.READ: self._op_read,
            Op.GET_PERMS: self._op_get_perms,
            Op.WATCH: self._op_watch,
            Op.UNWATCH: self._op_unwatch,
            Op.TRANSACTION_START: self._op_transaction_start,
            Op.TRANSACTION_END: self._op_transaction_end,
            Op.INTRODUCE: self._op_introduce,
            Op.RELEASE: self._op_release,
            Op.GET_DOMAIN_PATH: self._op_get_domain_path,
            Op.WRITE: self._op_write,
            Op.MKDIR: self._op_mkdir,
            Op.RM: self._op_rm,
            Op.SET_PERMS: self._op_set_perms,
            Op.IS_DOMAIN_INTRODUCED: self._op_is_domain_introduced,
            Op.RESUME: self._op_resume,
            Op.SET_TARGET: self._op_set_target,
            Op.RESET_WATCHES: self._op_reset_watches,
            Op.DIRECTORY_PART: self._op_directory_part,
        }
        # The requests handle_fast answers, and its outbox (empty between requests).
        self._fast: dict[int, Handler] = {
            Op.READ: self._op_read,
            Op.WRITE: self._op_write,
            Op.DIRECTORY: self._op_directory,
        }
        self._fast_out = Outbox()

    # ----------------------------------------------------------------- connections

    def connect(
        self,
        kind: ConnKind = ConnKind.SOCKET,
        domid: int = 0,
        peer: dict[str, Any] | None = None,
    ) -> int:
        """Register a new client and return its connection id.

        A SOCKET connection is privileged dom0.  A GUEST connection acts as the unprivileged
        introduced domain ``domid`` (LookupError if it is not introduced).  ``peer`` is
        copied into every audit record of the connection.
        """
        if kind is ConnKind.GUEST:
            dom = self.domains.get(domid)
            if dom is None:
                raise LookupError(f"domain {domid} is not introduced")
        else:
            dom = None
            domid = 0
        conn_id = self._next_conn
        self._next_conn += 1
        conn = Connection(conn_id, kind, domid, dict(peer or {}))
        if dom is not None:
            dom.conn_ids.add(conn_id)
            conn.target = dom.target
        self.conns[conn_id] = conn
        if self.audit is not None:
            self._clear_audit_scratch()
            self.audit.append(self._record(conn, "connect", 0, "OK"))
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a client: its watches and transactions go (§5.8)."""
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        self.watches.remove_conn(conn_id)
        conn.transactions.clear()
        dom = self.domains.get(conn.domid) if conn.kind is ConnKind.GUEST else None
        if dom is not None:
            dom.conn_ids.discard(conn_id)
        if self.audit is not None:
            self._clear_audit_scratch()
            self.audit.append(self._record(conn, "disconnect", 0, "OK"))

    def is_connected(self, conn_id: int) -> bool:
        return conn_id in self.conns

    def outstanding_limit(self, conn_id: int) -> int | None:
        """How many unsent replies and events a connection may have before the shell stops
        reading it (the ``outstanding`` quota; None for privileged connections)."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.privileged:
            return None
        return self.quotas.outstanding

    def take_audit(self) -> list[dict[str, Any]]:
        """Audit records since the last call (empty when auditing is off)."""
        records = self.audit
        if not records:
            return []
        self.audit = []
        return records

    # --------------------------------------------------------------------- requests

    def handle(self, conn_id: int, packet: Packet) -> Outbox:
        """Process one request and return every message it causes, in sending order."""
        conn = self.conns[conn_id]
        out = Outbox()
        op = packet.op
        audit = self.audit
        if audit is not None:
            self._rule = self._apath = None
            self._apaths = self._aargs = None
        txn: Transaction | None = None
        try:
            handler = self._handlers.get(op)
            if handler is None:
                raise XsErrno("ENOSYS")
            if not conn.privileged and op in PRIVILEGED_OPS:
                self._rule = "privileged-only"
                raise XsErrno("EACCES")
            if packet.tx_id and op not in _TX_FREE:
                txn = conn.transactions.get(packet.tx_id)
                if txn is None:
                    raise XsErrno("ENOENT")
            payload = handler(conn, packet, txn, out)
            n = len(payload)
            if n > PAYLOAD_MAX:
                raise XsErrno("E2BIG")
            if n > _REPLY_BUFFER and not conn.privileged and self._over_memory(conn.domid, n):
                # C send_reply: a reply buffer over the memory quota becomes ENOMEM; the
                # transaction is not failed by it.
                result = "ENOMEM"
                payload = _errno_payload(result)
                out.append((conn_id, Packet(_ERROR, packet.req_id, packet.tx_id, payload)))
            else:
                out.append((conn_id, Packet(op, packet.req_id, packet.tx_id, payload)))
                result = "OK"
        except XsErrno as exc:
            result = exc.errno
            if (
                txn is not None
                and result in _TX_FAILING
                and op != Op.TRANSACTION_END
                and exc.fails_transaction
            ):
                txn.failed = True
            out.append(
                (conn_id, Packet(_ERROR, packet.req_id, packet.tx_id, _errno_payload(result)))
            )
        after = self._after  # set by WATCH only, as its last step
        if after is not None:
            self._after = None
            out.append(after)
        if audit is not None:
            audit.append(self._record(conn, packet.op_name, packet.tx_id, result))
        return out

    def handle_fast(self, conn_id: int, packet: Packet) -> bytes | Outbox | None:
        """:meth:`handle` for the common requests, with less work per request.

        A privileged READ, WRITE or DIRECTORY outside a transaction, with auditing off, runs
        the same handler as :meth:`handle`; its reply comes back encoded, ready to send, when
        it causes no other message, else as the :class:`Outbox` :meth:`handle` would return.
        None: any other request; call :meth:`handle`.
        """
        conn = self.conns[conn_id]
        handler = self._fast.get(packet.op)
        if handler is None or packet.tx_id or not conn.privileged or self.audit is not None:
            return None
        out = self._fast_out
        op = packet.op
        try:
            payload = handler(conn, packet, None, out)
            if len(payload) > PAYLOAD_MAX:
                raise XsErrno("E2BIG")
        except XsErrno as exc:
            op = _ERROR
            payload = _errno_payload(exc.errno)
        except BaseException:
            self._fast_out = Outbox()  # drop what the failed request queued
            raise
        if out:  # watch events go before the reply (§1.13)
            self._fast_out = Outbox()
            out.append((conn_id, Packet(op, packet.req_id, 0, payload)))
            return out
        return HEADER.pack(op, packet.req_id, 0, len(payload)) + payload

    def _clear_audit_scratch(self) -> None:
        self._rule = self._apath = None
        self._apaths = self._aargs = None

    def _record(self, conn: Connection, op: str, tx: int, result: str) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "t": self._clock(),
            "conn": conn.id,
            "domid": conn.domid,
            "priv": conn.privileged,
            "op": op,
            "tx": tx,
            "result": result,
        }
        if self._apath is not None:
            rec["path"] = self._apath
        if self._apaths is not None:
            rec["paths"] = self._apaths
        if self._rule is not None:
            rec["rule"] = self._rule
        if self._aargs is not None:
            rec["args"] = self._aargs
        rec.update(conn.peer)
        return rec

    # -------------------------------------------------------------- access helpers

    def _path(self, conn: Connection, raw: bytes, special: bool = False) -> str:
        try:
            path = canonicalize(raw, conn.implicit, self.quotas.path_max, allow_special=special)
        except XsErrno:
            if self.audit is not None:
                self._apath = raw.decode("latin-1")
            raise
        self._apath = path
        return path

    def _perm(self, conn: Connection, perms: Perms) -> int:
        """C ``perm_for_conn`` for an unprivileged connection (§3.3)."""
        owner = perms[0][1]
        domid = conn.domid
        target = conn.target
        if owner == domid:
            self._rule = "owner"
            return PERM_ALL
        if target is not None and owner == target:
            self._rule = "target-owner"
            return PERM_ALL
        for i in range(1, len(perms)):
            mask, who = perms[i]
            if who in (domid, target) and not mask & PERM_IGNORE:
                self._rule = "acl:" + entry_string(mask, who)
                return mask
        self._rule = "default:" + LETTERS[perms[0][0] & PERM_BOTH]
        return perms[0][0] & PERM_BOTH

    def _get(self, txn: Transaction | None, path: str) -> Node | None:
        """The node as the request sees it; inside a transaction, its private copy."""
        if txn is None:
            return self.store.nodes.get(path)
        nodes = txn.nodes
        if path in nodes:
            return nodes[path]
        if txn.node_limit and len(nodes) >= txn.node_limit:
            raise XsErrno("ENOSPC")  # transaction-nodes quota (§7.3)
        node = self.store.nodes.get(path)
        if node is None:
            nodes[path] = None
            txn.recorded[path] = NO_GENERATION
            return None
        copy = node.copy()
        nodes[path] = copy
        txn.recorded[path] = node.generation
        if txn.node_limit:
            copy.acc = acc = copy.size() + len(path) + txn.key_extra
            txn.memory += acc
        return copy

    def _get_chk(self, conn: Connection, txn: Transaction | None, path: str, need: int) -> Node:
        """C get_node(): a missing or forbidden node asks the parents what to say."""
        node = self._get(txn, path)
        if node is None:
            raise XsErrno(self._errno_from_parents(conn, txn, path, need))
        if conn.privileged:
            self._rule = "privileged"
        elif self._perm(conn, node.perms) & need != need:
            self._deny(conn, txn, path, need)
        return node

    def _deny(self, conn: Connection, txn: Transaction | None, path: str, need: int) -> NoReturn:
        """EACCES for an existing node; C get_node() still reads the parents."""
        rule = self._rule  # the node's own rule refused it
        self._errno_from_parents(conn, txn, path, need, "EACCES")
        self._rule = rule
        raise XsErrno("EACCES")

    def _errno_from_parents(
        self, conn: Connection, txn: Transaction | None, path: str, need: int, errno: str = "ENOENT"
    ) -> str:
        """C errno_from_parents(): the error stands only if the nearest existing ancestor
        grants any of the rights asked for, so a guest cannot probe for nodes under a
        directory it may not use (§3.8).  Each ancestor looked at counts as read by the
        transaction (C ask_parents() reads them), privileged or not."""
        if txn is None and conn.privileged:
            self._rule = "privileged"
            return errno  # nothing to record, and every ancestor grants everything
        p = path
        while p != "/":
            p = parent_of(p)
            node = self._get(txn, p)
            if node is not None:
                if conn.privileged:
                    self._rule = "privileged"
                    return errno
                if self._perm(conn, node.perms) & need:
                    self._rule = "ancestor-enoent"
                    return errno
                self._rule = "ancestor-eacces"
                return "EACCES"
        return errno  # pragma: no cover - the root always exists

    def _put(self, txn: Transaction | None, path: str, node: Node) -> None:
        node.generation = self.store.next_generation()
        if txn is None:
            if node.acc or node.perms[0][1]:
                self.store.charge(path, node)
            self.store.nodes[path] = node
        else:
            txn.nodes[path] = node
            txn.modified[path] = None
            if txn.node_limit:
                acc = node.size() + len(path) + txn.key_extra
                txn.memory += acc - node.acc
                node.acc = acc

    def domain_memory(self, domid: int) -> int:
        """Bytes charged to a domain's memory quota (xenstore-facts.md §7.3): the nodes it
        owns, its connections' watches and its transactions' private copies."""
        mem = self.store.memory.get(domid, 0)
        dom = self.domains.get(domid)
        if dom is not None:
            conns = self.conns
            for cid in dom.conn_ids:
                c = conns[cid]
                mem += c.watch_mem
                for t in c.transactions.values():
                    mem += t.memory
        return mem

    def _over_memory(self, domid: int, grow: int) -> bool:
        """C ``domain_memory_add``: would ``grow`` more bytes reach the hard quota of this
        unprivileged domain?  Crossing the soft quota only logs a warning."""
        if grow <= 0 or domid not in self.domains:
            return False
        before = self.domain_memory(domid)
        total = before + grow
        q = self.quotas
        if total >= q.memory:
            return True
        if before < q.soft_memory <= total:
            _log.warning("Domain %d exceeds soft memory quota", domid)
        return False

    def _mem_check(self, domid: int, grow: int) -> None:
        # A node write over the quota: C's write_node_raw turns the ENOMEM into EIO.
        if domid and self._over_memory(domid, grow):
            self._refused_write()
            raise XsErrno("EIO")

    def _refused_write(self, nodes: int = 1) -> None:
        """C write_node(): access_node() takes a generation before write_node_raw() can
        refuse the write (size or memory quota), so a refused write still uses one; each
        node create_node() had already written takes two (its write and its removal)."""
        self.store.generation += 2 * nodes - 1

    def _count(self, txn: Transaction | None, owner: int, delta: int) -> None:
        if txn is None:
            self.store.count_owner(owner, delta)
        else:
            txn.owned_delta[owner] = txn.owned_delta.get(owner, 0) + delta

    # ------------------------------------------------------------------- watches

    def _changed(
        self,
        out: Outbox,
        txn: Transaction | None,
        path: str,
        node: Node | None,
        old_perms: Perms | None = None,
        exact: bool = False,
    ) -> None:
        if txn is None:
            self._fire(out, path, node, exact, old_perms)
        elif path not in txn.events:
            txn.events[path] = TxEvent(path, node, exact, old_perms)
        elif not exact:
            txn.events[path].exact = False  # C queue_watches(): non-exact replaces exact

    def _fire(
        self, out: Outbox, path: str, node: Node | None, exact: bool, old_perms: Perms | None
    ) -> None:
        watches = self.watches.exact(path) if exact else self.watches.matching(path)
        if not watches:
            return
        rule = self._rule  # permission checks for watchers must not overwrite the audit rule
        conns = self.conns
        bpath = path.encode()
        for w in watches:
            c = conns[w.conn_id]
            if not c.privileged and not self._watch_permitted(c, path, node, old_perms):
                continue
            epath = bpath
            if w.relative:
                home = c.implicit
                if path.startswith(home) and path[len(home) : len(home) + 1] == "/":
                    epath = bpath[len(home) + 1 :]
            payload = epath + b"\0" + w.token + b"\0"
            if len(payload) > PAYLOAD_MAX:
                continue  # XSA-324: an oversized event is dropped
            out.append((c.id, Packet(_WATCH_EVENT, 0, 0, payload)))
        self._rule = rule

    def _watch_permitted(
        self, conn: Connection, path: str, node: Node | None, old_perms: Perms | None
    ) -> bool:
        """XSA-115 (§4.6): the watcher must be able to read the node or its parent; for
        SET_PERMS the old permissions count too.  Special names use their own perms."""
        if path[0] == "@":
            perms = self.special_perms.get(path)
            return perms is not None and bool(self._perm(conn, perms) & PERM_READ)
        if old_perms is not None and self._perm(conn, old_perms) & PERM_READ:
            return True
        if node is None:
            node = self.store.nodes.get(path)
            if node is None:
                return False
        if self._perm(conn, node.perms) & PERM_READ:
            return True
        if path == "/":
            return False
        parent = self.store.nodes.get(parent_of(path))
        return parent is not None and bool(self._perm(conn, parent.perms) & PERM_READ)

    # ---------------------------------------------------------------- node ops

    def _op_read(self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox) -> bytes:
        # C 4.17 answers an empty or unterminated READ with a stale errno, ENOENT on a fresh
        # connection (oracle README, "Known defects"); ENOENT is kept, deterministically.
        if not p.payload or p.payload[-1] != 0:
            raise XsErrno("ENOENT")
        path = self._path(conn, _onearg(p.payload))
        return self._get_chk(conn, txn, path, PERM_READ).value

    def _op_write(self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox) -> bytes:
        payload = p.payload
        i = payload.find(b"\0")
        if i < 0:
            raise XsErrno("EINVAL")
        path = self._path(conn, payload[:i])
        value = payload[i + 1 :]
        node = self._get(txn, path)
        if node is None:
            node = self._create(conn, txn, path, value)
        else:
            if conn.privileged:
                self._rule = "privileged"
            else:
                if not self._perm(conn, node.perms) & PERM_WRITE:
                    self._deny(conn, txn, path, PERM_WRITE)
                if node.size() - len(node.value) + len(value) >= self.quotas.node_size:
                    self._refused_write()
                    raise XsErrno("ENOSPC")
            grow = len(value) - len(node.value)
            if grow > 0:
                self._mem_check(txn.domid if txn is not None else node.perms[0][1], grow)
            node.value = value
            self._put(txn, path, node)
        self._changed(out, txn, path, node)
        return OK

    def _op_mkdir(self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox) -> bytes:
        path = self._path(conn, _onearg(p.payload))
        node = self._get(txn, path)
        if node is not None:
            # An existing node is OK and unchanged, but still needs write access (§3.8).
            if conn.privileged:
                self._rule = "privileged"
            elif not self._perm(conn, node.perms) & PERM_WRITE:
                self._deny(conn, txn, path, PERM_WRITE)
            return OK
        node = self._create(conn, txn, path, b"")
        self._changed(out, txn, path, node)
        return OK

    def _create(self, conn: Connection, txn: Transaction | None, path: str, value: bytes) -> Node:
        """Create ``path`` and its missing parents (C ``create_node``)."""
        missing = [path]
        anc = parent_of(path)
        while True:
            parent = self._get(txn, anc)
            if parent is not None:
                break
            missing.append(anc)
            anc = parent_of(anc)
        perms = parent.perms
        if conn.privileged:
            self._rule = "privileged"
        else:
            if not self._perm(conn, parent.perms) & PERM_WRITE:
                self._rule = "ancestor-eacces"
                raise XsErrno("EACCES")
            # An unprivileged creator owns what it creates (§3.7).
            perms = ((perms[0][0], conn.domid), *perms[1:])
            q = self.quotas
            owned = self.store.owned.get(conn.domid, 0)
            if txn is not None:
                owned += txn.owned_delta.get(conn.domid, 0)
            if owned + len(missing) > q.nodes:
                # C create_node() checks the quota per created node, bottom up: the ones
                # written before it ran out go again through destroy_node() (two generations
                # each), which fails an enclosing transaction (XSA-415); none written, none fails.
                written = max(0, q.nodes - owned)
                self.store.generation += 2 * written
                raise XsErrno("ENOSPC", fails_transaction=written > 0)
            top = basename(missing[-1])
            leaf = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(perms) + len(value)
            if leaf >= q.node_size:
                self._refused_write()  # the deepest node is written first
                raise XsErrno("ENOSPC")
            if parent.size() + len(top) + 1 >= q.node_size:
                self._refused_write(len(missing) + 1)  # the existing ancestor is written last
                raise XsErrno("ENOSPC")
        owner = txn.domid if txn is not None else perms[0][1]
        top_grow = len(basename(missing[-1])) + 1
        pown = txn.domid if txn is not None else parent.perms[0][1]
        if owner:
            base = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(perms)
            if txn is not None:
                base += txn.key_extra
            grow = len(value) + sum(base + len(p) for p in missing)
            grow += sum(len(basename(p)) + 1 for p in missing[:-1])
            self._mem_check(owner, grow + top_grow if pown == owner else grow)
        if pown and pown != owner:
            self._mem_check(pown, top_grow)
        # C writes the deepest node first, then each new parent, then the existing ancestor:
        # that order decides the generation numbers.
        child: str | None = None
        created: Node | None = None
        for p in missing:
            node = Node(b"" if created is not None else value, perms, None)
            if child is not None:
                node.add_child(child)
            else:
                created = node
            self._put(txn, p, node)
            child = basename(p)
        assert child is not None and created is not None
        parent.add_child(child)
        self._put(txn, anc, parent)
        self._count(txn, perms[0][1], len(missing))
        return created

    def _op_rm(self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox) -> bytes:
        path = self._path(conn, _onearg(p.payload))
        node = self._get(txn, path)
        if node is None:
            errno = self._errno_from_parents(conn, txn, path, PERM_WRITE)
            # A missing node under an existing parent is fine (C do_rm).
            if errno == "ENOENT" and self._get(txn, parent_of(path)) is not None:
                return OK
            raise XsErrno(errno)
        if conn.privileged:
            self._rule = "privileged"
        elif not self._perm(conn, node.perms) & PERM_WRITE:
            self._deny(conn, txn, path, PERM_WRITE)
        if path == "/":
            raise XsErrno("EINVAL")
        self._delete_tree(out, txn, path, node)
        return OK

    def _delete_tree(self, out: Outbox, txn: Transaction | None, top: str, node: Node) -> None:
        """Remove a subtree (no per-child permission checks, §3.9) and fire its watches:
        each removed descendant fires the watches set exactly on it, in post-order, then
        the top fires its own watches and its ancestors' (§4.4).

        C rm_node(): the parent is read first (EINVAL if a transaction no longer sees it);
        walk_node_tree() reads each child as it descends and stops with EIO at one that a
        transaction's view lists but cannot read, the nodes removed so far staying removed.
        """
        anc = parent_of(top)
        parent = self._get(txn, anc)
        if parent is None:
            raise XsErrno("EINVAL")
        order, complete = self._walk(txn, top, node)
        if not complete:
            assert txn is not None  # outside a transaction the tree is whole
            self._delete_partly(out, txn, order)
            raise XsErrno("EIO", fails_transaction=False)
        for path, n in order[:-1]:
            self._changed(out, txn, path, n, exact=True)
        store = self.store
        # C 4.17 takes a generation for every deleted node and for every child entry it
        # removes from a parent on the way.
        store.generation += 2 * len(order) - 1
        if txn is None:
            nodes = store.nodes
            for path, n in order:
                del nodes[path]
                store.count_owner(n.perms[0][1], -1)
                if n.acc:
                    store.uncharge(n)
        else:
            for path, n in order:
                self._tx_forget(txn, path, n)
        if basename(top) not in parent.children:
            # C delete_child(): the transaction's copy of the parent predates the node, so
            # the entry is not found: EIO, the subtree staying removed.
            self._changed(out, txn, top, node)
            raise XsErrno("EIO", fails_transaction=False)
        parent.remove_child(basename(top))
        self._put(txn, anc, parent)
        self._changed(out, txn, top, node)

    def _walk(
        self, txn: Transaction | None, top: str, node: Node
    ) -> tuple[list[tuple[str, Node]], bool]:
        """The subtree in C walk_node_tree() post-order; False if a child was unreadable."""
        order: list[tuple[str, Node]] = []
        stack: list[tuple[str, Node, tuple[str, ...], int]] = [(top, node, tuple(node.children), 0)]
        while stack:
            path, n, kids, i = stack[-1]
            if i == len(kids):
                stack.pop()
                order.append((path, n))
                continue
            stack[-1] = (path, n, kids, i + 1)
            cp = child_path(path, kids[i])
            cn = self._get(txn, cp)
            if cn is None:
                return order, False
            stack.append((cp, cn, tuple(cn.children), 0))
        return order, True

    def _delete_partly(self, out: Outbox, txn: Transaction, order: list[tuple[str, Node]]) -> None:
        """What an interrupted walk leaves: each node finished so far removed (a generation),
        and its entry taken out of its parent (a write, another generation)."""
        for path, n in order:
            self.store.generation += 1
            self._changed(out, txn, path, n, exact=True)
            self._tx_forget(txn, path, n)
            pp = parent_of(path)
            pn = txn.nodes.get(pp)
            if pn is not None:
                pn.remove_child(basename(path))
                self._put(txn, pp, pn)

    def _tx_forget(self, txn: Transaction, path: str, n: Node) -> None:
        txn.nodes[path] = None
        txn.modified[path] = None
        self._count(txn, n.perms[0][1], -1)
        txn.memory -= n.acc
        n.acc = 0

    def _op_directory(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        path = self._path(conn, _onearg(p.payload))
        return self._get_chk(conn, txn, path, PERM_READ).children_blob()

    def _op_directory_part(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        # C send_directory_part(): exactly two NULs (an unterminated tail is ignored); the
        # offset is atoi() taken as unsigned, so a negative one lies past the list.
        if p.payload.count(b"\0") != 2:
            raise XsErrno("EINVAL")
        args = _c_strings(p.payload)
        path = self._path(conn, args[0])
        node = self._get_chk(conn, txn, path, PERM_READ)
        offset = atoi(args[1]) & 0xFFFFFFFF
        head = b"%d\0" % node.generation
        blob = node.children_blob()
        if offset >= len(blob):
            return head + b"\0"
        rest = blob[offset:]
        room = PAYLOAD_MAX - len(head)
        if len(rest) + 1 <= room:
            return head + rest + b"\0"  # the extra NUL marks the end of the list
        return head + rest[: rest.rfind(b"\0", 0, room) + 1]  # whole names only

    def _op_get_perms(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        raw = _onearg(p.payload)
        if raw[:1] == b"@":
            raise XsErrno("EINVAL")  # 4.17: the special names have no GET_PERMS
        path = self._path(conn, raw)
        return format_perms(self._get_chk(conn, txn, path, PERM_READ).perms)

    def _op_set_perms(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        # C do_set_perms(): as many strings as NULs (an unterminated tail is ignored), the
        # perms quota, the parse, the owner's existence, and only then the node.
        payload = p.payload
        count = payload.count(b"\0")
        if count < 2:
            raise XsErrno("EINVAL")
        args = payload.split(b"\0")[:count]
        priv = conn.privileged
        if not priv and count - 1 > self.quotas.permissions:
            raise XsErrno("ENOSPC", fails_transaction=False)  # nothing touched yet
        perms = self._existing(parse_perms(args[1:]))
        if perms[0][0] & PERM_IGNORE:
            raise XsErrno("ENOENT")  # the owner domain does not exist
        raw = args[0]
        if raw[:1] == b"@":
            name = self._path(conn, raw, special=True)
            if not conn.privileged or name not in self.special_perms:
                raise XsErrno("EINVAL")
            self._rule = "privileged"
            self.special_perms[name] = perms
            return OK
        path = self._path(conn, raw)
        node = self._get_chk(conn, txn, path, PERM_WRITE | PERM_OWNER)
        old = node.perms
        if not priv:
            if perms[0][1] != old[0][1]:
                raise XsErrno("EPERM")  # an unprivileged owner cannot give a node away
            grown = PERM_ENTRY_SIZE * (len(perms) - len(old))
            if node.size() + grown >= self.quotas.node_size:
                self._refused_write()
                raise XsErrno("ENOSPC")
        grow = PERM_ENTRY_SIZE * (len(perms) - len(old))
        if txn is not None:
            self._mem_check(txn.domid, grow)
        elif perms[0][1] != old[0][1]:
            self._mem_check(perms[0][1], node.size() + grow + len(path))
            self.store.uncharge(node)  # recharged to the new owner by _put
        else:
            self._mem_check(old[0][1], grow)
        node.perms = perms
        self._put(txn, path, node)
        if perms[0][1] != old[0][1]:
            self._count(txn, old[0][1], -1)
            self._count(txn, perms[0][1], 1)
        self._changed(out, txn, path, node, old)
        return OK

    def _existing(self, perms: Perms) -> Perms:
        """C domain_alloc_permrefs(): an entry naming a domain that does not exist (past
        the last ordinary domid and not introduced) is marked to be ignored."""
        if all(who < DOMID_FIRST_RESERVED or who in self.domains for _, who in perms):
            return perms
        return tuple(
            (m, who)
            if who < DOMID_FIRST_RESERVED or who in self.domains
            else (m | PERM_IGNORE, who)
            for m, who in perms
        )

    # ------------------------------------------------------------------ watches

    def _op_watch(self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox) -> bytes:
        raw, token = _two_strings(p.payload)
        # C check_watch_path(): an @ name is only limited in length; then duplicates, then
        # the quota (do_watch()).
        if raw[:1] == b"@":
            if len(raw) > REL_PATH_MAX:
                raise XsErrno("EINVAL")
            path = self._apath = raw.decode("latin-1")
        else:
            path = self._path(conn, raw)
        if self.watches.has(conn.id, path, token):
            raise XsErrno("EEXIST")
        if not conn.privileged and self._domain_watches(conn.domid) > self.quotas.watches:
            raise XsErrno("E2BIG")  # 4.17: E2BIG once a domain has more than the quota
        relative = raw[:1] not in (b"/", b"@")
        # C add_watch charges path + token to the domain, dom0 included: ENOMEM over the
        # quota (§4.11).
        cost = len(path) + len(token)
        if not conn.privileged and self._over_memory(conn.domid, cost):
            raise XsErrno("ENOMEM")
        if self.watches.add(conn.id, path, token, relative) is None:
            raise XsErrno("EEXIST")
        conn.watch_mem += cost
        # The first event carries the path as given and follows the OK (§4.2).
        event = raw + b"\0" + token + b"\0"
        if len(event) <= PAYLOAD_MAX:
            self._after = (conn.id, Packet(_WATCH_EVENT, 0, 0, event))
        return OK

    def _domain_watches(self, domid: int) -> int:
        dom = self.domains.get(domid)
        if dom is None:
            return 0
        return sum(self.watches.count(cid) for cid in dom.conn_ids)

    def _op_unwatch(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        raw, token = _two_strings(p.payload)
        # C do_unwatch() canonicalizes without validating: a bad path matches no watch.
        path = raw.decode("latin-1")
        if raw[:1] not in (b"/", b"@"):
            path = conn.implicit + "/" + path
        self._apath = path
        if not self.watches.remove(conn.id, path, token):
            raise XsErrno("ENOENT")
        conn.watch_mem -= len(path) + len(token)
        return OK

    def _op_reset_watches(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        # Drops the caller's transactions too, the current one included (§4.10, XSA-484).
        self.watches.remove_conn(conn.id)
        conn.watch_mem = 0
        conn.transactions.clear()
        return OK

    # ------------------------------------------------------------- transactions

    def _op_transaction_start(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        if txn is not None:
            raise XsErrno("EBUSY")  # no nesting (§5.1)
        if not conn.privileged:
            dom = self.domains.get(conn.domid)
            open_tx = sum(len(self.conns[c].transactions) for c in dom.conn_ids) if dom else 0
            if open_tx > self.quotas.transactions:
                raise XsErrno("ENOSPC")
        tx_id = conn.next_tx
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
        self.store.generation += 1  # C: trans->generation = ++generation
        limit = 0 if conn.privileged else self.quotas.transaction_nodes
        conn.transactions[tx_id] = Transaction(
            tx_id, conn.id, conn.domid, limit, self.store.generation
        )
        return b"%d\0" % tx_id

    def _op_transaction_end(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        # C do_transaction_end(): an unknown id was refused by transaction_lookup() already;
        # the argument is checked before the missing transaction of tx_id 0.
        if not p.payload or p.payload.find(b"\0") != len(p.payload) - 1:
            raise XsErrno("EINVAL")
        arg = p.payload[:-1]
        if arg not in (b"T", b"F"):
            raise XsErrno("EINVAL")  # the transaction stays open
        if txn is None:
            raise XsErrno("ENOENT")
        del conn.transactions[txn.id]
        if arg == b"F":
            return OK
        if txn.failed:
            raise XsErrno("ENOMEM")
        self._commit(out, txn)
        if self.audit is not None:
            self._apaths = list(txn.modified)
        return OK

    def _commit(self, out: Outbox, txn: Transaction) -> None:
        store = self.store
        nodes = store.nodes
        for path, gen in txn.recorded.items():
            cur = nodes.get(path)
            if (cur.generation if cur is not None else NO_GENERATION) != gen:
                raise XsErrno("EAGAIN")
        if txn.node_limit:
            grow = txn.owned_delta.get(txn.domid, 0)
            if grow > 0 and store.owned.get(txn.domid, 0) + grow > self.quotas.nodes:
                raise XsErrno("ENOSPC")
        for path in txn.modified:
            new = txn.nodes[path]
            old = nodes.get(path)
            if old is not None:
                store.count_owner(old.perms[0][1], -1)
                if old.acc:
                    store.uncharge(old)
            if new is None:
                if old is not None:
                    del nodes[path]
            else:
                new.generation = store.next_generation()
                new.acc = 0  # the transaction's charge ends with it
                if new.perms[0][1]:
                    store.charge(path, new)
                nodes[path] = new
                store.count_owner(new.perms[0][1], 1)
        # C finalize_transaction() fires in the order the nodes were first accessed.
        events = txn.events
        if len(events) > 1:
            first = {path: i for i, path in enumerate(txn.recorded)}
            order = sorted(events.values(), key=lambda ev: first.get(ev.path, len(first)))
        else:
            order = list(events.values())
        for ev in order:
            self._fire(out, ev.path, ev.node, ev.exact, ev.old_perms)

    # ------------------------------------------------------------------ domains

    def _op_get_domain_path(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        domid = atoi(_onearg(p.payload)) & 0xFFFFFFFF  # 4.17 uses atoi (§6.4)
        return b"/local/domain/%d\0" % domid

    def _op_is_domain_introduced(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        domid = atoi(_onearg(p.payload)) & 0xFFFFFFFF  # C: an unsigned int
        known = domid == 0 or domid == DOMID_SELF or domid in self.domains
        return b"T\0" if known else b"F\0"

    def _op_introduce(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        args = _c_strings(p.payload)
        if len(args) < 3:
            raise XsErrno("EINVAL")
        domid = atoi(args[0]) & 0xFFFFFFFF
        port = atoi(args[2]) & 0xFFFFFFFF  # C do_introduce(): an unsigned evtchn_port_t
        if port == 0:
            raise XsErrno("EINVAL")
        self._rule = "privileged"
        if domid == 0:
            return OK  # dom0 is the privileged socket: nothing to serve
        dom = self.domains.get(domid)
        if dom is not None:
            # Re-introduction resets the domain's connections (§6.1) and fires nothing.
            dom.port = port
            for cid in dom.conn_ids:
                self.watches.remove_conn(cid)
                self.conns[cid].watch_mem = 0
                self.conns[cid].transactions.clear()
            return OK
        self.domains[domid] = Domain(domid, port)
        out.introduced += (domid,)
        self._fire(out, INTRODUCE_DOMAIN, None, False, None)
        return OK

    def _domain_arg(self, p: Packet) -> Domain:
        """RELEASE/RESUME argument: EINVAL for dom0, ENOENT if not introduced."""
        domid = atoi(_onearg(p.payload)) & 0xFFFFFFFF  # C onearg_domain(): unsigned
        if domid == 0:
            raise XsErrno("EINVAL")
        self._rule = "privileged"
        dom = self.domains.get(domid)
        if dom is None:
            raise XsErrno("ENOENT")
        return dom

    def _op_resume(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        self._domain_arg(p)
        return OK

    def _op_release(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        dom = self._domain_arg(p)
        deleted = self.release_domain(out, dom.domid)
        if self.audit is not None:
            self._apaths = deleted
        return OK

    def release_domain(self, out: Outbox, domid: int) -> list[str]:
        """Forget an introduced domain (C ``do_release``; §6.2, §6.7).

        Its connections are dropped first, so its own node removals do not wake it.  Every
        node it owns goes, with its subtree and normal RM events (XSA-419); its ACL
        entries on other nodes stay listed but are ignored from now on, and are removed from
        the special names (XSA-322: a re-introduced domid inherits nothing); ``@releaseDomain``
        fires last.  Returns the removed subtree tops.
        """
        dom = self.domains.pop(domid)
        for cid in sorted(dom.conn_ids):
            self.disconnect(cid)
            out.closed += (cid,)
        for other in self.domains.values():
            if other.target == domid:
                other.target = None
                for cid in other.conn_ids:
                    self.conns[cid].target = None
        nodes = self.store.nodes
        tops: list[str] = []
        stripped: list[str] = []
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = nodes[path]
            if path != "/" and node.perms[0][1] == domid:
                tops.append(path)
                continue
            if any(who == domid for _, who in node.perms[1:]) or node.perms[0][1] == domid:
                stripped.append(path)
            stack.extend(child_path(path, name) for name in reversed(node.children))
        if self.keep_orphans:
            self._adopt_orphans(domid)
            tops = []
        for path in tops:
            top = nodes.get(path)
            if top is not None:
                self._delete_tree(out, None, path, top)
        for path in stripped:
            node = nodes[path]
            perms = node.perms
            # 4.17 keeps the released domain's ACL entries, listed but ignored (C
            # domain_adjust_node_perms(), XSA-322), without rewriting the node.
            acl = tuple((m | PERM_IGNORE, w) if w == domid else (m, w) for m, w in perms[1:])
            if perms[0][1] == domid:
                # Only `/` can survive its owner's release; dom0 takes it over.
                self.store.uncharge(node)
                self.store.count_owner(0, 1)
                node.perms = ((perms[0][0], 0), *acl)
                self._put(None, path, node)
            else:
                node.perms = (perms[0], *acl)
        for name, perms in self.special_perms.items():
            self.special_perms[name] = (perms[0], *(e for e in perms[1:] if e[1] != domid))
        self.store.owned.pop(domid, None)
        self.store.memory.pop(domid, None)
        out.released += (domid,)
        self._fire(out, RELEASE_DOMAIN, None, False, None)
        return tops

    def _adopt_orphans(self, domid: int) -> None:
        """C -K (domain_tree_remove() with keep_orphans): every node the domain owns passes
        to dom0 in place, no generation taken and no watch fired."""
        store = self.store
        for node in store.nodes.values():
            perms = node.perms
            if perms[0][1] == domid:
                store.uncharge(node)
                store.count_owner(domid, -1)
                store.count_owner(0, 1)
                node.perms = ((perms[0][0], 0), *perms[1:])

    def _op_set_target(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        args = _c_strings(p.payload)
        if len(args) < 2:
            raise XsErrno("EINVAL")
        domid = atoi(args[0]) & 0xFFFFFFFF
        target = atoi(args[1]) & 0xFFFFFFFF
        self._rule = "privileged"
        dom = self.domains.get(domid)
        # C do_set_target(): both must be connected domains; dom0 always is, and its own
        # ring is no socket, so setting its target changes nothing here.
        if (dom is None and domid != 0) or (target != 0 and target not in self.domains):
            raise XsErrno("ENOENT")
        if dom is None:
            return OK
        dom.target = target
        for cid in dom.conn_ids:
            self.conns[cid].target = target
        return OK

    # ------------------------------------------------------------------ control

    def _op_control(
        self, conn: Connection, p: Packet, txn: Transaction | None, out: Outbox
    ) -> bytes:
        self._rule = "privileged"
        # C do_control(): the command must be NUL-terminated; the arguments are the
        # NUL-terminated strings after it (an unterminated tail is ignored).
        if b"\0" not in p.payload:
            raise XsErrno("EINVAL")
        args = _c_strings(p.payload)
        if self.audit is not None:
            self._aargs = [a.decode("latin-1") for a in args]
        return control.run(self, args)

    # ------------------------------------------------------------ introspection

    def domain_usage(self, domid: int) -> dict[str, int]:
        """What CONTROL ``quota <domid>`` reports (C 4.17 accounting)."""
        nodes = self.store.owned.get(domid, 0)
        if domid:
            memory = self.domain_memory(domid)
        else:
            # dom0 is never charged as it goes; its figure is computed on demand.
            # dom0 is never charged as it goes; its figure is computed on demand: its nodes,
            # and the watches and transaction copies of the sockets (C conn->id 0).
            memory = sum(
                node.size() + len(path)
                for path, node in self.store.nodes.items()
                if node.perms[0][1] == 0
            )
            for c in self.conns.values():
                if c.domid == 0:
                    memory += c.watch_mem
                    for t in c.transactions.values():
                        memory += sum(
                            n.size() + len(path) + t.key_extra
                            for path, n in t.nodes.items()
                            if n is not None
                        )
        dom = self.domains.get(domid)
        watches = transactions = outstanding = 0
        if dom is not None:
            for cid in dom.conn_ids:
                watches += self.watches.count(cid)
                transactions += len(self.conns[cid].transactions)
                outstanding += self.unsent(cid)
        return {
            "nodes": nodes,
            "watches": watches,
            "transactions": transactions,
            "outstanding": outstanding,
            "memory": memory,
        }

    def check(self) -> list[str]:
        """Consistency problems of the tree (CONTROL ``check``); empty when sound."""
        problems: list[str] = []
        nodes = self.store.nodes
        for path, node in nodes.items():
            for name in node.children:
                if child_path(path, name) not in nodes:
                    problems.append(f"{path}: missing child {name}")
            if path != "/":
                parent = nodes.get(parent_of(path))
                if parent is None or basename(path) not in parent.children:
                    problems.append(f"{path}: not linked from its parent")
        return problems

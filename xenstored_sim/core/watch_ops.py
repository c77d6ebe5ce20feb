"""WATCH, UNWATCH, RESET_WATCHES and the firing of watch events.

cf. tools/xenstored/watch.c: do_watch(), do_unwatch(), do_reset_watches(), fire_watches(),
watch_permitted(); core.c: queue_watches() for the events a transaction holds back.
"""

from __future__ import annotations

from typing import Final

from ..wire import PAYLOAD_MAX, REL_PATH_MAX, Op, Packet
from .access import canon, perm
from .cstring import two_strings
from .domains import Connection
from .errors import XsErrno
from .paths import parent_of
from .perms import PERM_READ, Perms
from .request import Outbox, Request
from .state import XenstoreState
from .store import Node
from .transactions import Transaction, TxEvent

OK: Final = b"OK\0"
_WATCH_EVENT: Final = int(Op.WATCH_EVENT)


def do_watch(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    raw, token = two_strings(p.payload)
    # C check_watch_path(): an @ name is only limited in length; then duplicates, then
    # the quota (do_watch()).
    if raw[:1] == b"@":
        if len(raw) > REL_PATH_MAX:
            raise XsErrno("EINVAL")
        path = req.path = raw.decode("latin-1")
    else:
        path = canon(st, req, conn, raw)
    if st.watches.has(conn.id, path, token):
        raise XsErrno("EEXIST")
    if not conn.privileged and domain_watches(st, conn.domid) > st.quotas.watches:
        raise XsErrno("E2BIG")  # 4.17: E2BIG once a domain has more than the quota
    relative = raw[:1] not in (b"/", b"@")
    # C add_watch charges path + token to the domain, dom0 included: ENOMEM over the
    # quota (docs/xenstore.md, 'Quotas').
    cost = len(path) + len(token)
    if not conn.privileged and st.over_memory(conn.domid, cost):
        raise XsErrno("ENOMEM")
    if st.watches.add(conn.id, path, token, relative) is None:
        raise XsErrno("EEXIST")
    conn.watch_mem += cost
    # The first event carries the path as given and follows the OK (docs/xenstore.md, 'Watches').
    event = raw + b"\0" + token + b"\0"
    if len(event) <= PAYLOAD_MAX:
        req.after = (conn.id, Packet(_WATCH_EVENT, 0, 0, event))
    return OK


def domain_watches(st: XenstoreState, domid: int) -> int:
    dom = st.domains.get(domid)
    if dom is None:
        return 0
    return sum(st.watches.count(cid) for cid in dom.conn_ids)


def do_unwatch(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    raw, token = two_strings(p.payload)
    # C do_unwatch() canonicalizes without validating: a bad path matches no watch.
    path = raw.decode("latin-1")
    if raw[:1] not in (b"/", b"@"):
        path = conn.implicit + "/" + path
    req.path = path
    if not st.watches.remove(conn.id, path, token):
        raise XsErrno("ENOENT")
    conn.watch_mem -= len(path) + len(token)
    return OK


def do_reset_watches(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    # Drops the caller's transactions too, the current one included (docs/xenstore.md, 'Watches', XSA-484).
    st.watches.remove_conn(conn.id)
    conn.watch_mem = 0
    conn.transactions.clear()
    return OK


def changed(
    st: XenstoreState,
    out: Outbox,
    txn: Transaction | None,
    path: str,
    node: Node | None,
    old_perms: Perms | None = None,
    exact: bool = False,
) -> None:
    """A node changed: fire now, or hold the event until the transaction commits."""
    if txn is None:
        fire(st, out, path, node, exact, old_perms)
    elif path not in txn.events:
        txn.events[path] = TxEvent(path, node, exact, old_perms)
    elif not exact:
        txn.events[path].exact = False  # C queue_watches(): non-exact replaces exact


def fire(
    st: XenstoreState,
    out: Outbox,
    path: str,
    node: Node | None,
    exact: bool,
    old_perms: Perms | None,
) -> None:
    """C fire_watches(): an event to each watcher of the path (or of an ancestor)."""
    watches = st.watches.exact(path) if exact else st.watches.matching(path)
    if not watches:
        return
    conns = st.conns
    bpath = path.encode()
    for w in watches:
        c = conns[w.conn_id]
        if not c.privileged and not watch_permitted(st, c, path, node, old_perms):
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


def watch_permitted(
    st: XenstoreState, conn: Connection, path: str, node: Node | None, old_perms: Perms | None
) -> bool:
    """XSA-115 (docs/xenstore.md, 'Watches'): the watcher must be able to read the node or its parent; for
    SET_PERMS the old permissions count too.  Special names use their own perms."""
    if path[0] == "@":
        perms = st.special_perms.get(path)
        return perms is not None and bool(perm(None, conn, perms) & PERM_READ)
    if old_perms is not None and perm(None, conn, old_perms) & PERM_READ:
        return True
    if node is None:
        node = st.store.nodes.get(path)
        if node is None:
            return False
    if perm(None, conn, node.perms) & PERM_READ:
        return True
    if path == "/":
        return False
    parent = st.store.nodes.get(parent_of(path))
    return parent is not None and bool(perm(None, conn, parent.perms) & PERM_READ)

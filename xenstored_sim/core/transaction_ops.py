"""TRANSACTION_START and TRANSACTION_END: private copies, checked and applied at commit.

cf. tools/xenstored/transaction.c: do_transaction_start(), do_transaction_end(),
check_transaction(), finalize_transaction().
"""

from __future__ import annotations

from typing import Final

from ..wire import Packet
from .domains import Connection
from .errors import XsErrno
from .request import Outbox, Request
from .state import XenstoreState
from .store import NO_GENERATION
from .transactions import Transaction
from .watch_ops import fire

OK: Final = b"OK\0"


def do_transaction_start(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    if txn is not None:
        raise XsErrno("EBUSY")  # no nesting (docs/xenstore.md, 'Transactions')
    if not conn.privileged:
        dom = st.domains.get(conn.domid)
        open_tx = sum(len(st.conns[c].transactions) for c in dom.conn_ids) if dom else 0
        if open_tx > st.quotas.transactions:
            raise XsErrno("ENOSPC")
    tx_id = conn.next_tx
    while tx_id == 0 or tx_id in conn.transactions:
        tx_id = (tx_id + 1) & 0xFFFFFFFF
    conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
    st.store.generation += 1  # C: trans->generation = ++generation
    limit = 0 if conn.privileged else st.quotas.transaction_nodes
    conn.transactions[tx_id] = Transaction(tx_id, conn.id, conn.domid, limit, st.store.generation)
    return b"%d\0" % tx_id


def do_transaction_end(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
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
    commit(st, out, txn)
    if st.audit is not None:
        req.paths = list(txn.modified)
    return OK


def commit(st: XenstoreState, out: Outbox, txn: Transaction) -> None:
    """Check the generations read, the node quota, then apply and fire (C
    check_transaction(), finalize_transaction())."""
    store = st.store
    nodes = store.nodes
    for path, gen in txn.recorded.items():
        cur = nodes.get(path)
        if (cur.generation if cur is not None else NO_GENERATION) != gen:
            raise XsErrno("EAGAIN")
    if txn.node_limit:
        grow = txn.owned_delta.get(txn.domid, 0)
        if grow > 0 and store.owned.get(txn.domid, 0) + grow > st.quotas.nodes:
            raise XsErrno("ENOSPC")
    # C finalize_transaction() writes the modified nodes in the order they were first
    # accessed (its trans->accessed list), each taking the next generation.
    modified = txn.modified
    applied = [path for path in txn.recorded if path in modified]
    if len(applied) != len(modified):
        applied += [path for path in modified if path not in txn.recorded]
    for path in applied:
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
        fire(st, out, ev.path, ev.node, ev.exact, ev.old_perms)

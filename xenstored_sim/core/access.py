"""Reading, checking and writing nodes on behalf of a request.

cf. tools/xenstored/core.c: canonicalize(), perm_for_conn(), get_node(),
errno_from_parents(), write_node(); tools/xenstored/domain.c: domain_memory_add().
Inside a transaction a request sees and changes private copies (C transaction.c:
access_node()).
"""

from __future__ import annotations

from typing import NoReturn

from .domains import Connection
from .errors import XsErrno
from .paths import canonicalize, parent_of
from .perms import LETTERS, PERM_ALL, PERM_BOTH, PERM_IGNORE, Perms, entry_string
from .request import Request
from .state import XenstoreState
from .store import NO_GENERATION, Node
from .transactions import Transaction


def canon(
    st: XenstoreState, req: Request, conn: Connection, raw: bytes, special: bool = False
) -> str:
    """The canonical path of a request argument (C canonicalize()), noted for the audit."""
    try:
        path = canonicalize(raw, conn.implicit, st.quotas.path_max, allow_special=special)
    except XsErrno:
        if st.audit is not None:
            req.path = raw.decode("latin-1")
        raise
    req.path = path
    return path


def perm(req: Request | None, conn: Connection, perms: Perms) -> int:
    """C ``perm_for_conn`` for an unprivileged connection (docs/xenstore.md, 'Permissions'); the deciding rule goes to
    ``req`` (None: a watcher's check, which must not change the request's rule)."""
    owner = perms[0][1]
    domid = conn.domid
    target = conn.target
    if owner == domid:
        if req is not None:
            req.rule = "owner"
        return PERM_ALL
    if target is not None and owner == target:
        if req is not None:
            req.rule = "target-owner"
        return PERM_ALL
    for i in range(1, len(perms)):
        mask, who = perms[i]
        if who in (domid, target) and not mask & PERM_IGNORE:
            if req is not None:
                req.rule = "acl:" + entry_string(mask, who)
            return mask
    if req is not None:
        req.rule = "default:" + LETTERS[perms[0][0] & PERM_BOTH]
    return perms[0][0] & PERM_BOTH


def get(st: XenstoreState, txn: Transaction | None, path: str) -> Node | None:
    """The node as the request sees it; inside a transaction, its private copy."""
    if txn is None:
        return st.store.nodes.get(path)
    nodes = txn.nodes
    if path in nodes:
        return nodes[path]
    if txn.node_limit and len(nodes) >= txn.node_limit:
        raise XsErrno("ENOSPC")  # transaction-nodes quota (docs/xenstore.md, 'Quotas')
    node = st.store.nodes.get(path)
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


def get_chk(
    st: XenstoreState, req: Request, conn: Connection, txn: Transaction | None, path: str, need: int
) -> Node:
    """C get_node(): a missing or forbidden node asks the parents what to say."""
    node = get(st, txn, path)
    if node is None:
        raise XsErrno(errno_from_parents(st, req, conn, txn, path, need))
    if conn.privileged:
        req.rule = "privileged"
    elif perm(req, conn, node.perms) & need != need:
        deny(st, req, conn, txn, path, need)
    return node


def deny(
    st: XenstoreState, req: Request, conn: Connection, txn: Transaction | None, path: str, need: int
) -> NoReturn:
    """EACCES for an existing node; C get_node() still reads the parents."""
    rule = req.rule  # the node's own rule refused it
    errno_from_parents(st, req, conn, txn, path, need, "EACCES")
    req.rule = rule
    raise XsErrno("EACCES")


def errno_from_parents(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    txn: Transaction | None,
    path: str,
    need: int,
    errno: str = "ENOENT",
) -> str:
    """C errno_from_parents(): the error stands only if the nearest existing ancestor
    grants any of the rights asked for, so a guest cannot probe for nodes under a
    directory it may not use (docs/xenstore.md, 'Permissions').  Each ancestor looked at counts as read by the
    transaction (C ask_parents() reads them), privileged or not."""
    if txn is None and conn.privileged:
        req.rule = "privileged"
        return errno  # nothing to record, and every ancestor grants everything
    p = path
    while p != "/":
        p = parent_of(p)
        node = get(st, txn, p)
        if node is not None:
            if conn.privileged:
                req.rule = "privileged"
                return errno
            if perm(req, conn, node.perms) & need:
                req.rule = "ancestor-enoent"
                return errno
            req.rule = "ancestor-eacces"
            return "EACCES"
    return errno  # pragma: no cover - the root always exists


def put(st: XenstoreState, txn: Transaction | None, path: str, node: Node) -> None:
    """C write_node(): a new generation, and the node charged to its owner."""
    node.generation = st.store.next_generation()
    if txn is None:
        if node.acc or node.perms[0][1]:
            st.store.charge(path, node)
        st.store.nodes[path] = node
    else:
        txn.nodes[path] = node
        txn.modified[path] = None
        if txn.node_limit:
            acc = node.size() + len(path) + txn.key_extra
            txn.memory += acc - node.acc
            node.acc = acc


def mem_check(st: XenstoreState, domid: int, grow: int) -> None:
    """A node write over the quota: C's write_node_raw turns the ENOMEM into EIO."""
    if domid and st.over_memory(domid, grow):
        refused_write(st)
        raise XsErrno("EIO")


def refused_write(st: XenstoreState, nodes: int = 1) -> None:
    """C write_node(): access_node() takes a generation before write_node_raw() can
    refuse the write (size or memory quota), so a refused write still uses one; each
    node create_node() had already written takes two (its write and its removal)."""
    st.store.generation += 2 * nodes - 1


def count(st: XenstoreState, txn: Transaction | None, owner: int, delta: int) -> None:
    """Per-owner node counts; inside a transaction, noted until the commit."""
    if txn is None:
        st.store.count_owner(owner, delta)
    else:
        txn.owned_delta[owner] = txn.owned_delta.get(owner, 0) + delta

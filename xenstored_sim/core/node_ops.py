"""The node requests: READ, WRITE, MKDIR, RM, DIRECTORY(_PART), GET_PERMS, SET_PERMS.

cf. tools/xenstored/core.c: do_read(), do_write(), do_mkdir(), create_node(), do_rm(),
rm_node(), walk_node_tree(), send_directory(), send_directory_part(), do_get_perms(),
do_set_perms(); domain.c: domain_alloc_permrefs().
"""

from __future__ import annotations

from typing import Final

from ..wire import PAYLOAD_MAX, Packet
from .access import (
    canon,
    count,
    deny,
    errno_from_parents,
    get,
    get_chk,
    mem_check,
    perm,
    put,
    refused_write,
)
from .cstring import atou, c_strings, onearg
from .domains import DOMID_FIRST_RESERVED, Connection
from .errors import XsErrno
from .paths import basename, child_path, parent_of
from .perms import PERM_IGNORE, PERM_OWNER, PERM_READ, PERM_WRITE, Perms, format_perms, parse_perms
from .request import Outbox, Request
from .state import XenstoreState
from .store import NODE_HEADER_SIZE, PERM_ENTRY_SIZE, Node
from .transactions import Transaction
from .watch_ops import changed

OK: Final = b"OK\0"


def do_read(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    # C 4.17 answers an empty or unterminated READ with a stale errno, ENOENT on a fresh
    # connection (oracle README, "Known defects"); ENOENT is kept, deterministically.
    if not p.payload or p.payload[-1] != 0:
        raise XsErrno("ENOENT")
    path = canon(st, req, conn, onearg(p.payload))
    return get_chk(st, req, conn, txn, path, PERM_READ).value


def do_write(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    payload = p.payload
    i = payload.find(b"\0")
    if i < 0:
        raise XsErrno("EINVAL")
    path = canon(st, req, conn, payload[:i])
    value = payload[i + 1 :]
    node = get(st, txn, path)
    if node is None:
        node = create(st, req, conn, txn, path, value)
    else:
        if conn.privileged:
            req.rule = "privileged"
        else:
            if not perm(req, conn, node.perms) & PERM_WRITE:
                deny(st, req, conn, txn, path, PERM_WRITE)
            if node.size() - len(node.value) + len(value) >= st.quotas.node_size:
                refused_write(st)
                raise XsErrno("ENOSPC")
        grow = len(value) - len(node.value)
        if grow > 0:
            mem_check(st, txn.domid if txn is not None else node.perms[0][1], grow)
        node.value = value
        put(st, txn, path, node)
    changed(st, out, txn, path, node)
    return OK


def do_mkdir(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    path = canon(st, req, conn, onearg(p.payload))
    node = get(st, txn, path)
    if node is not None:
        # An existing node is OK and unchanged, but still needs write access (docs/xenstore.md, 'Permissions').
        if conn.privileged:
            req.rule = "privileged"
        elif not perm(req, conn, node.perms) & PERM_WRITE:
            deny(st, req, conn, txn, path, PERM_WRITE)
        return OK
    node = create(st, req, conn, txn, path, b"")
    changed(st, out, txn, path, node)
    return OK


def _check_create(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    txn: Transaction | None,
    missing: list[str],
    parent: Node,
    leaf: int,
) -> None:
    """create_node()'s refusals for an unprivileged creator: access, node count, size."""
    if not perm(req, conn, parent.perms) & PERM_WRITE:
        req.rule = "ancestor-eacces"
        raise XsErrno("EACCES")
    q = st.quotas
    owned = st.store.owned.get(conn.domid, 0)
    if txn is not None:
        owned += txn.owned_delta.get(conn.domid, 0)
    if owned + len(missing) > q.nodes:
        # C create_node() checks the quota per created node, bottom up: the ones written
        # before it ran out go again through destroy_node() (two generations each), which
        # fails an enclosing transaction (XSA-415); none written, none fails.
        written = max(0, q.nodes - owned)
        st.store.generation += 2 * written
        raise XsErrno("ENOSPC", fails_transaction=written > 0)
    if leaf >= q.node_size:
        refused_write(st)  # the deepest node is written first
        raise XsErrno("ENOSPC")
    if parent.size() + len(basename(missing[-1])) + 1 >= q.node_size:
        refused_write(st, len(missing) + 1)  # the existing ancestor is written last
        raise XsErrno("ENOSPC")


def _charge_create(
    st: XenstoreState,
    txn: Transaction | None,
    missing: list[str],
    parent: Node,
    perms: Perms,
    value: bytes,
) -> None:
    """The memory the new nodes cost their owner, and the parent's new entry its owner."""
    owner = txn.domid if txn is not None else perms[0][1]
    top_grow = len(basename(missing[-1])) + 1
    pown = txn.domid if txn is not None else parent.perms[0][1]
    if owner:
        base = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(perms)
        if txn is not None:
            base += txn.key_extra
        grow = len(value) + sum(base + len(p) for p in missing)
        grow += sum(len(basename(p)) + 1 for p in missing[:-1])
        mem_check(st, owner, grow + top_grow if pown == owner else grow)
    if pown and pown != owner:
        mem_check(st, pown, top_grow)


def create(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    txn: Transaction | None,
    path: str,
    value: bytes,
) -> Node:
    """Create ``path`` and its missing parents (C ``create_node``)."""
    missing = [path]
    anc = parent_of(path)
    while True:
        parent = get(st, txn, anc)
        if parent is not None:
            break
        missing.append(anc)
        anc = parent_of(anc)
    perms = parent.perms
    if conn.privileged:
        req.rule = "privileged"
    else:
        # An unprivileged creator owns what it creates (docs/xenstore.md, 'New nodes').
        perms = ((perms[0][0], conn.domid), *perms[1:])
        leaf = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(perms) + len(value)
        _check_create(st, req, conn, txn, missing, parent, leaf)
    _charge_create(st, txn, missing, parent, perms, value)
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
        put(st, txn, p, node)
        child = basename(p)
    assert child is not None and created is not None
    parent.add_child(child)
    put(st, txn, anc, parent)
    count(st, txn, perms[0][1], len(missing))
    return created


def do_rm(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    path = canon(st, req, conn, onearg(p.payload))
    node = get(st, txn, path)
    if node is None:
        errno = errno_from_parents(st, req, conn, txn, path, PERM_WRITE)
        # A missing node under an existing parent is fine (C do_rm).
        if errno == "ENOENT" and get(st, txn, parent_of(path)) is not None:
            return OK
        raise XsErrno(errno)
    if conn.privileged:
        req.rule = "privileged"
    elif not perm(req, conn, node.perms) & PERM_WRITE:
        deny(st, req, conn, txn, path, PERM_WRITE)
    if path == "/":
        raise XsErrno("EINVAL")
    delete_tree(st, out, txn, path, node)
    return OK


def delete_tree(
    st: XenstoreState, out: Outbox, txn: Transaction | None, top: str, node: Node
) -> None:
    """Remove a subtree (no per-child permission checks, docs/xenstore.md, 'Permissions') and fire its watches:
    each removed descendant fires the watches set exactly on it, in post-order, then
    the top fires its own watches and its ancestors' (docs/xenstore.md, 'Watches').

    C rm_node(): the parent is read first (EINVAL if a transaction no longer sees it);
    walk_node_tree() reads each child as it descends and stops with EIO at one that a
    transaction's view lists but cannot read, the nodes removed so far staying removed.
    """
    anc = parent_of(top)
    parent = get(st, txn, anc)
    if parent is None:
        raise XsErrno("EINVAL")
    order, complete = _walk(st, txn, top, node)
    if not complete:
        assert txn is not None  # outside a transaction the tree is whole
        _delete_partly(st, out, txn, order)
        raise XsErrno("EIO", fails_transaction=False)
    for path, n in order[:-1]:
        changed(st, out, txn, path, n, exact=True)
    store = st.store
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
            _tx_forget(st, txn, path, n)
    if basename(top) not in parent.children:
        # C delete_child(): the transaction's copy of the parent predates the node, so
        # the entry is not found: EIO, the subtree staying removed.
        changed(st, out, txn, top, node)
        raise XsErrno("EIO", fails_transaction=False)
    parent.remove_child(basename(top))
    put(st, txn, anc, parent)
    changed(st, out, txn, top, node)


def _walk(
    st: XenstoreState, txn: Transaction | None, top: str, node: Node
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
        cn = get(st, txn, cp)
        if cn is None:
            return order, False
        stack.append((cp, cn, tuple(cn.children), 0))
    return order, True


def _delete_partly(
    st: XenstoreState, out: Outbox, txn: Transaction, order: list[tuple[str, Node]]
) -> None:
    """What an interrupted walk leaves: each node finished so far removed (a generation),
    and its entry taken out of its parent (a write, another generation)."""
    for path, n in order:
        st.store.generation += 1
        changed(st, out, txn, path, n, exact=True)
        _tx_forget(st, txn, path, n)
        pp = parent_of(path)
        pn = txn.nodes.get(pp)
        if pn is not None:
            pn.remove_child(basename(path))
            put(st, txn, pp, pn)


def _tx_forget(st: XenstoreState, txn: Transaction, path: str, n: Node) -> None:
    txn.nodes[path] = None
    txn.modified[path] = None
    count(st, txn, n.perms[0][1], -1)
    txn.memory -= n.acc
    n.acc = 0


def do_directory(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    path = canon(st, req, conn, onearg(p.payload))
    return get_chk(st, req, conn, txn, path, PERM_READ).children_blob()


def do_directory_part(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    # C send_directory_part(): exactly two NULs (an unterminated tail is ignored); the
    # offset is atoi() taken as unsigned, so a negative one lies past the list.
    if p.payload.count(b"\0") != 2:
        raise XsErrno("EINVAL")
    args = c_strings(p.payload)
    path = canon(st, req, conn, args[0])
    node = get_chk(st, req, conn, txn, path, PERM_READ)
    offset = atou(args[1])
    head = b"%d\0" % node.generation
    blob = node.children_blob()
    if offset >= len(blob):
        return head + b"\0"
    rest = blob[offset:]
    room = PAYLOAD_MAX - len(head)
    if len(rest) + 1 <= room:
        return head + rest + b"\0"  # the extra NUL marks the end of the list
    return head + rest[: rest.rfind(b"\0", 0, room) + 1]  # whole names only


def do_get_perms(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    raw = onearg(p.payload)
    if raw[:1] == b"@":
        raise XsErrno("EINVAL")  # 4.17: the special names have no GET_PERMS
    path = canon(st, req, conn, raw)
    return format_perms(get_chk(st, req, conn, txn, path, PERM_READ).perms)


def do_set_perms(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    # C do_set_perms(): as many strings as NULs (an unterminated tail is ignored), the
    # perms quota, the parse, the owner's existence, and only then the node.
    payload = p.payload
    n_args = payload.count(b"\0")
    if n_args < 2:
        raise XsErrno("EINVAL")
    args = payload.split(b"\0")[:n_args]
    if not conn.privileged and n_args - 1 > st.quotas.permissions:
        raise XsErrno("ENOSPC", fails_transaction=False)  # nothing touched yet
    perms = _existing(st, parse_perms(args[1:]))
    if perms[0][0] & PERM_IGNORE:
        raise XsErrno("ENOENT")  # the owner domain does not exist
    raw = args[0]
    if raw[:1] == b"@":
        name = canon(st, req, conn, raw, special=True)
        if not conn.privileged or name not in st.special_perms:
            raise XsErrno("EINVAL")
        req.rule = "privileged"
        st.special_perms[name] = perms
        return OK
    path = canon(st, req, conn, raw)
    node = get_chk(st, req, conn, txn, path, PERM_WRITE | PERM_OWNER)
    old = node.perms
    _charge_perms(st, conn, txn, path, node, perms)
    node.perms = perms
    put(st, txn, path, node)
    if perms[0][1] != old[0][1]:
        count(st, txn, old[0][1], -1)
        count(st, txn, perms[0][1], 1)
    changed(st, out, txn, path, node, old)
    return OK


def _charge_perms(
    st: XenstoreState,
    conn: Connection,
    txn: Transaction | None,
    path: str,
    node: Node,
    perms: Perms,
) -> None:
    """do_set_perms()'s refusals and the memory the new list costs (or moves to a new owner)."""
    old = node.perms
    grow = PERM_ENTRY_SIZE * (len(perms) - len(old))
    if not conn.privileged:
        if perms[0][1] != old[0][1]:
            raise XsErrno("EPERM")  # an unprivileged owner cannot give a node away
        if node.size() + grow >= st.quotas.node_size:
            refused_write(st)
            raise XsErrno("ENOSPC")
    if txn is not None:
        mem_check(st, txn.domid, grow)
    elif perms[0][1] != old[0][1]:
        mem_check(st, perms[0][1], node.size() + grow + len(path))
        st.store.uncharge(node)  # recharged to the new owner by put()
    else:
        mem_check(st, old[0][1], grow)


def _existing(st: XenstoreState, perms: Perms) -> Perms:
    """C domain_alloc_permrefs(): an entry naming a domain that does not exist (past
    the last ordinary domid and not introduced) is marked to be ignored."""
    domains = st.domains
    if all(who < DOMID_FIRST_RESERVED or who in domains for _, who in perms):
        return perms
    return tuple(
        (m, who) if who < DOMID_FIRST_RESERVED or who in domains else (m | PERM_IGNORE, who)
        for m, who in perms
    )

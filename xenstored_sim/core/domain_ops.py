"""The domain requests: INTRODUCE, RELEASE, RESUME, SET_TARGET, IS_DOMAIN_INTRODUCED,
GET_DOMAIN_PATH.

cf. tools/xenstored/domain.c: do_introduce(), do_release(), do_resume(), do_set_target(),
do_is_domain_introduced(), do_get_domain_path(), domain_tree_remove(),
domain_adjust_node_perms().
"""

from __future__ import annotations

from typing import Final

from ..wire import DOMID_SELF, Packet
from .access import put
from .cstring import atou, c_args, onearg
from .domains import Connection, Domain
from .errors import XsErrno
from .node_ops import delete_tree
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN, child_path
from .perms import PERM_IGNORE
from .request import Outbox, Request
from .state import XenstoreState
from .transactions import Transaction
from .watch_ops import fire

OK: Final = b"OK\0"


def do_get_domain_path(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    domid = atou(onearg(p.payload))  # 4.17 uses atoi (docs/xenstore.md, 'Domains')
    return b"/local/domain/%d\0" % domid


def do_is_domain_introduced(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    domid = atou(onearg(p.payload))  # C: an unsigned int
    known = domid == 0 or domid == DOMID_SELF or domid in st.domains
    return b"T\0" if known else b"F\0"


def do_introduce(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    args = c_args(p.payload, 3)
    domid = atou(args[0])
    port = atou(args[2])  # C do_introduce(): an unsigned evtchn_port_t
    if port == 0:
        raise XsErrno("EINVAL")
    req.rule = "privileged"
    if domid == 0:
        return OK  # dom0 is the privileged socket: nothing to serve
    dom = st.domains.get(domid)
    if dom is not None:
        # Re-introduction resets the domain's connections (docs/xenstore.md, 'Domains') and fires nothing.
        dom.port = port
        for cid in dom.conn_ids:
            st.watches.remove_conn(cid)
            st.conns[cid].watch_mem = 0
            st.conns[cid].transactions.clear()
        return OK
    st.domains[domid] = Domain(domid, port)
    out.introduced += (domid,)
    fire(st, out, INTRODUCE_DOMAIN, None, False, None)
    return OK


def _domain_arg(st: XenstoreState, req: Request, p: Packet) -> Domain:
    """RELEASE/RESUME argument: EINVAL for dom0, ENOENT if not introduced."""
    domid = atou(onearg(p.payload))  # C onearg_domain(): unsigned
    if domid == 0:
        raise XsErrno("EINVAL")
    req.rule = "privileged"
    dom = st.domains.get(domid)
    if dom is None:
        raise XsErrno("ENOENT")
    return dom


def do_resume(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    _domain_arg(st, req, p)
    return OK


def do_release(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    dom = _domain_arg(st, req, p)
    deleted = release_domain(st, out, dom.domid)
    if st.audit is not None:
        req.paths = deleted
    return OK


def release_domain(st: XenstoreState, out: Outbox, domid: int) -> list[str]:
    """Forget an introduced domain (C ``do_release``; docs/xenstore.md, 'Domains', docs/xenstore.md, 'Domains').

    Its connections are dropped first, so its own node removals do not wake it.  Every
    node it owns goes, with its subtree and normal RM events (XSA-419); its ACL
    entries on other nodes stay listed but are ignored from now on, and are removed from
    the special names (XSA-322: a re-introduced domid inherits nothing); ``@releaseDomain``
    fires last.  Returns the removed subtree tops.
    """
    dom = st.domains.pop(domid)
    for cid in sorted(dom.conn_ids):
        st.disconnect(cid)
        out.closed += (cid,)
    for other in st.domains.values():
        if other.target == domid:
            other.target = None
            for cid in other.conn_ids:
                st.conns[cid].target = None
    tops, stripped = _owned_and_listed(st, domid)
    if st.keep_orphans:
        _adopt_orphans(st, domid)
        tops = []
    nodes = st.store.nodes
    for path in tops:
        top = nodes.get(path)
        if top is not None:
            delete_tree(st, out, None, path, top)
    _strip_acls(st, domid, stripped)
    for name, perms in st.special_perms.items():
        st.special_perms[name] = (perms[0], *(e for e in perms[1:] if e[1] != domid))
    st.store.owned.pop(domid, None)
    st.store.memory.pop(domid, None)
    out.released += (domid,)
    fire(st, out, RELEASE_DOMAIN, None, False, None)
    return tops


def _owned_and_listed(st: XenstoreState, domid: int) -> tuple[list[str], list[str]]:
    """The tops of the subtrees the domain owns, and the other nodes that name it."""
    nodes = st.store.nodes
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
    return tops, stripped


def _strip_acls(st: XenstoreState, domid: int, stripped: list[str]) -> None:
    """4.17 keeps the released domain's ACL entries, listed but ignored (C
    domain_adjust_node_perms(), XSA-322), without rewriting the node."""
    nodes = st.store.nodes
    for path in stripped:
        node = nodes[path]
        perms = node.perms
        acl = tuple((m | PERM_IGNORE, w) if w == domid else (m, w) for m, w in perms[1:])
        if perms[0][1] == domid:
            # Only `/` can survive its owner's release; dom0 takes it over.
            st.store.uncharge(node)
            st.store.count_owner(0, 1)
            node.perms = ((perms[0][0], 0), *acl)
            put(st, None, path, node)
        else:
            node.perms = (perms[0], *acl)
            # No new generation, as in C; assigned again so that a durable store's journal
            # records the ignored entries (core/journal.py: NodeTracker).
            nodes[path] = node


def _adopt_orphans(st: XenstoreState, domid: int) -> None:
    """C -K (domain_tree_remove() with keep_orphans): every node the domain owns passes
    to dom0 in place, no generation taken and no watch fired."""
    store = st.store
    for node in store.nodes.values():
        perms = node.perms
        if perms[0][1] == domid:
            store.uncharge(node)
            store.count_owner(domid, -1)
            store.count_owner(0, 1)
            node.perms = ((perms[0][0], 0), *perms[1:])


def do_set_target(
    st: XenstoreState,
    req: Request,
    conn: Connection,
    p: Packet,
    txn: Transaction | None,
    out: Outbox,
) -> bytes:
    args = c_args(p.payload, 2)
    domid = atou(args[0])
    target = atou(args[1])
    req.rule = "privileged"
    dom = st.domains.get(domid)
    # C do_set_target(): both must be connected domains; dom0 always is, and its own
    # ring is no socket, so setting its target changes nothing here.
    if (dom is None and domid != 0) or (target != 0 and target not in st.domains):
        raise XsErrno("ENOENT")
    if dom is None:
        return OK
    dom.target = target
    for cid in dom.conn_ids:
        st.conns[cid].target = target
    return OK

"""Transactions as an overlay of touched nodes (docs/xenstore.md, 'Transactions').

Theory of operation (C 4.17, xenstored_transaction.c).  A transaction never copies the tree.
The first time it touches a node (read, write, the parent read when creating a child, a
directory listing) it takes a private copy of that node, or records that it is absent, and
notes the node's generation at that moment.  From then on it works on its copy, so later
writes by others are invisible inside.  At commit every noted generation is compared with
the store's current one: any difference means someone changed a node after the transaction
looked at it, and the commit fails with EAGAIN.  A write by someone else *before* the first
touch is no conflict (docs/xenstore.md, 'Transactions').

Modified nodes are written back in the order they were first modified, each taking a new
generation; watch events recorded during the transaction fire only then (docs/xenstore.md,
'Watches').
"""

from __future__ import annotations

from .perms import Perms
from .store import Node


class TxEvent:
    """A watch event held back until commit."""

    __slots__ = ("exact", "node", "old_perms", "path")

    def __init__(self, path: str, node: Node | None, exact: bool, old_perms: Perms | None) -> None:
        self.path = path
        self.node = node
        self.exact = exact
        self.old_perms = old_perms


class Transaction:
    """One open transaction of one connection."""

    __slots__ = (
        "conn_id",
        "domid",
        "events",
        "failed",
        "id",
        "key_extra",
        "memory",
        "modified",
        "node_limit",
        "nodes",
        "owned_delta",
        "recorded",
    )

    def __init__(
        self, tx_id: int, conn_id: int, domid: int, node_limit: int, generation: int = 0
    ) -> None:
        self.id = tx_id
        self.conn_id = conn_id
        self.domid = domid
        # 0 means unlimited (privileged connections, docs/xenstore.md, 'Transactions').
        self.node_limit = node_limit
        # path -> private copy, or None if absent inside the transaction
        self.nodes: dict[str, Node | None] = {}
        # path -> generation when first touched (NO_GENERATION if absent)
        self.recorded: dict[str, int] = {}
        # paths written or deleted, in first-modification order
        self.modified: dict[str, None] = {}
        self.events: dict[str, TxEvent] = {}
        # A failed operation inside the transaction fails its commit with ENOMEM (XSA-415).
        self.failed = False
        # owner domid -> nodes created minus nodes deleted inside the transaction
        self.owned_delta: dict[int, int] = {}
        # C keeps private copies in its database under "<tx generation>/<path>" and charges
        # them, key included, to the transaction's domain (docs/xenstore.md, 'Quotas').
        self.key_extra = len(str(generation)) + 1
        #: bytes of the private copies (only counted for unprivileged connections)
        self.memory = 0

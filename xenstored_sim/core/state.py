"""The daemon's state and its connection registry, without request handling.

Theory of operation.  :class:`XenstoreState` holds what C xenstored keeps in globals and in
its connection list (tools/xenstored/core.c, domain.c): the store, the connections, watches,
domains, the special names' permissions and quotas.  It also does the accounting the
request handlers and CONTROL ``quota`` share (C domain.c: domain_memory_add(),
domain_nbentry()).  The request path is :class:`~.engine.XenstoreEngine`; the handlers live
in the modules named after C's files (``node_ops``, ``domain_ops``, ``watch_ops``,
``transaction_ops``, ``control``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .domains import Connection, ConnKind, Domain
from .paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN, basename, child_path, parent_of
from .perms import DEFAULT_PERMS, Perms
from .quotas import Quotas
from .request import Request
from .store import Store
from .watches import WatchRegistry

_log = logging.getLogger("xenstored_sim")


def _nothing_unsent(conn_id: int) -> int:
    return 0


class XenstoreState:
    """The state of a C-xenstored-4.17-compatible daemon.

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
        # 4.17 keeps the special names' permissions apart from the tree (docs/xenstore.md, 'Paths').
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
            self.audit.append(self.record(conn, "connect", 0, "OK", Request()))
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a client: its watches and transactions go (docs/xenstore.md, 'Transactions')."""
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        self.watches.remove_conn(conn_id)
        conn.transactions.clear()
        dom = self.domains.get(conn.domid) if conn.kind is ConnKind.GUEST else None
        if dom is not None:
            dom.conn_ids.discard(conn_id)
        if self.audit is not None:
            self.audit.append(self.record(conn, "disconnect", 0, "OK", Request()))

    def is_connected(self, conn_id: int) -> bool:
        return conn_id in self.conns

    def outstanding_limit(self, conn_id: int) -> int | None:
        """How many unsent replies and events a connection may have before the shell stops
        reading it (the ``outstanding`` quota; None for privileged connections)."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.privileged:
            return None
        return self.quotas.outstanding

    # ----------------------------------------------------------------------- audit

    def take_audit(self) -> list[dict[str, Any]]:
        """Audit records since the last call (empty when auditing is off)."""
        records = self.audit
        if not records:
            return []
        self.audit = []
        return records

    def record(
        self, conn: Connection, op: str, tx: int, result: str, req: Request
    ) -> dict[str, Any]:
        """One audit record: who asked what, the outcome and what the handlers learnt."""
        rec: dict[str, Any] = {
            "t": self._clock(),
            "conn": conn.id,
            "domid": conn.domid,
            "priv": conn.privileged,
            "op": op,
            "tx": tx,
            "result": result,
        }
        if req.path is not None:
            rec["path"] = req.path
        if req.paths is not None:
            rec["paths"] = req.paths
        if req.rule is not None:
            rec["rule"] = req.rule
        if req.args is not None:
            rec["args"] = req.args
        rec.update(conn.peer)
        return rec

    # ------------------------------------------------------------------ accounting

    def domain_memory(self, domid: int) -> int:
        """Bytes charged to a domain's memory quota (docs/xenstore.md, 'Quotas'): the nodes it
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

    def over_memory(self, domid: int, grow: int) -> bool:
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

    def _dom0_memory(self) -> int:
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
        return memory

    # --------------------------------------------------------------- introspection

    def domain_usage(self, domid: int) -> dict[str, int]:
        """What CONTROL ``quota <domid>`` reports (C 4.17 accounting)."""
        nodes = self.store.owned.get(domid, 0)
        memory = self.domain_memory(domid) if domid else self._dom0_memory()
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

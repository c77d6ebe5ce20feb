"""Introduced domains and connections (docs/xenstore.md, 'Domains')."""

from __future__ import annotations

import enum
from typing import Final

from .paths import implicit_path
from .transactions import Transaction

#: ``DOMID_FIRST_RESERVED`` (xen/include/public/xen.h): ids from here on name no domain.
DOMID_FIRST_RESERVED: Final = 0x7FF0


class ConnKind(enum.Enum):
    """How a connection reached the daemon."""

    #: The privileged Unix socket: C gives it the store domain's id (0) and full privilege.
    SOCKET = "socket"
    #: ``RUNDIR/domains/<domid>.sock``: stands in for the domain's ring, unprivileged.
    GUEST = "guest"


class Domain:
    """An introduced domain."""

    __slots__ = ("conn_ids", "domid", "port", "target")

    def __init__(self, domid: int, port: int) -> None:
        self.domid = domid
        self.port = port
        # SET_TARGET: this domain acts as owner of nodes owned by ``target`` (docs/xenstore.md,
        # 'SET_TARGET and stub domains').
        self.target: int | None = None
        self.conn_ids: set[int] = set()


class Connection:
    """One client connection as the engine sees it."""

    __slots__ = (
        "domid",
        "id",
        "implicit",
        "kind",
        "next_tx",
        "peer",
        "privileged",
        "target",
        "transactions",
        "watch_mem",
    )

    def __init__(self, conn_id: int, kind: ConnKind, domid: int, peer: dict[str, object]) -> None:
        self.id = conn_id
        self.kind = kind
        self.domid = domid
        # C: privileged is conn->id == priv_domid; the socket has the store domain's id 0.
        self.privileged = kind is ConnKind.SOCKET
        self.implicit = implicit_path(domid)
        self.target: int | None = None
        self.transactions: dict[int, Transaction] = {}
        self.next_tx = 1
        self.peer = peer
        #: bytes of this connection's watches (path + token), charged to its domain
        #: (docs/xenstore.md, 'Quotas')
        self.watch_mem = 0

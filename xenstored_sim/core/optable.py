"""The one table of request types: who may send each, whether it runs in a transaction,
what its journal record carries, and its handler.

cf. tools/xenstored/core.c: ``wire_funcs[]`` (handler and flags per type) and
process_message(); XSA-115 made IS_DOMAIN_INTRODUCED privileged-only and WATCH/UNWATCH
ignore the transaction id (docs/xenstore.md, 'Watches').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..wire import Op, Packet
from .control import do_control
from .domain_ops import (
    do_get_domain_path,
    do_introduce,
    do_is_domain_introduced,
    do_release,
    do_resume,
    do_set_target,
)
from .domains import Connection
from .node_ops import (
    do_directory,
    do_directory_part,
    do_get_perms,
    do_mkdir,
    do_read,
    do_rm,
    do_set_perms,
    do_write,
)
from .request import Outbox, Request
from .state import XenstoreState
from .transaction_ops import do_transaction_end, do_transaction_start
from .transactions import Transaction
from .watch_ops import do_reset_watches, do_unwatch, do_watch

Handler = Callable[
    [XenstoreState, Request, Connection, Packet, "Transaction | None", Outbox], bytes
]


class OpSpec:
    """One request type (C ``struct func_table`` entry)."""

    __slots__ = ("handler", "journal_domains", "privileged", "transactional")

    def __init__(
        self,
        handler: Handler,
        *,
        privileged: bool = False,
        transactional: bool = True,
        journal_domains: bool = False,
    ) -> None:
        self.handler = handler
        #: only a privileged connection may send it (else EACCES)
        self.privileged = privileged
        #: runs in the transaction its tx_id names (ENOENT if unknown); False: tx_id ignored
        self.transactional = transactional
        #: may change the domain table, so its journal record carries that table
        self.journal_domains = journal_domains


OPS: Final[dict[int, OpSpec]] = {
    Op.CONTROL: OpSpec(do_control, privileged=True),
    Op.DIRECTORY: OpSpec(do_directory),
    Op.READ: OpSpec(do_read),
    Op.GET_PERMS: OpSpec(do_get_perms),
    Op.WATCH: OpSpec(do_watch, transactional=False),
    Op.UNWATCH: OpSpec(do_unwatch, transactional=False),
    Op.TRANSACTION_START: OpSpec(do_transaction_start),
    Op.TRANSACTION_END: OpSpec(do_transaction_end),
    Op.INTRODUCE: OpSpec(do_introduce, privileged=True, journal_domains=True),
    Op.RELEASE: OpSpec(do_release, privileged=True, journal_domains=True),
    Op.GET_DOMAIN_PATH: OpSpec(do_get_domain_path),
    Op.WRITE: OpSpec(do_write),
    Op.MKDIR: OpSpec(do_mkdir),
    Op.RM: OpSpec(do_rm),
    Op.SET_PERMS: OpSpec(do_set_perms),
    Op.IS_DOMAIN_INTRODUCED: OpSpec(do_is_domain_introduced, privileged=True),
    Op.RESUME: OpSpec(do_resume, privileged=True),
    Op.SET_TARGET: OpSpec(do_set_target, privileged=True, journal_domains=True),
    Op.RESET_WATCHES: OpSpec(do_reset_watches),
    Op.DIRECTORY_PART: OpSpec(do_directory_part),
}

#: The requests :meth:`~.engine.XenstoreEngine.handle_fast` answers.
FAST_OPS: Final = frozenset({int(Op.READ), int(Op.WRITE), int(Op.DIRECTORY)})

"""The xenstore daemon as a pure state machine.

Theory of operation.  :class:`XenstoreEngine` holds the store, the connections, watches,
transactions and domains (:class:`~.state.XenstoreState`).  The I/O shell calls
:meth:`~.state.XenstoreState.connect` for each new client,
:meth:`~XenstoreEngine.handle` for each request, and
:meth:`~.state.XenstoreState.disconnect` when a client goes away.  ``handle`` returns an
:class:`Outbox`: every message the request causes, in the order C xenstored queues them, as
``(conn_id, Packet)`` pairs.  The shell only routes them.

Ordering (docs/xenstore.md, 'Reply headers and event order'): watch events caused by a request are queued before its
reply, also for the requester's own watches; the first event of a new WATCH follows its OK.

Request processing follows C's ``process_message`` (tools/xenstored/core.c; docs/xenstore.md, 'Reply headers and event order'): an
unknown type is ENOSYS, a privileged-only type from a guest is EACCES, a non-zero unknown
transaction id is ENOENT (WATCH and UNWATCH ignore the id), then the handler of
:data:`~.optable.OPS` runs.  A reply over 4096 bytes becomes E2BIG (XSA-72); an event over
4096 bytes is dropped (XSA-324).  The handlers live in modules named after C's files:
``node_ops`` (core.c), ``domain_ops`` (domain.c), ``watch_ops`` (watch.c),
``transaction_ops`` (transaction.c), ``control`` (control.c).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ..wire import HEADER, PAYLOAD_MAX, NeedData, Op, Packet, PacketDecoder, encode
from .cstring import errno_payload
from .domains import Connection
from .errors import XsErrno
from .optable import FAST_OPS, OPS
from .outqueue import OutQueue
from .quotas import Quotas
from .request import Outbox, Request
from .state import XenstoreState
from .transactions import Transaction

__all__ = ["Outbox", "XenstoreEngine"]

_ERROR: Final = int(Op.ERROR)
_TRANSACTION_END: Final = int(Op.TRANSACTION_END)
_CONTROL: Final = int(Op.CONTROL)
_WATCH_EVENT: Final = int(Op.WATCH_EVENT)
# Errors that fail the enclosing transaction, whose commit then answers ENOMEM (docs/xenstore.md, 'Transactions'); EIO is
# a node write over the memory quota (C ``write_node`` fails the transaction).
_TX_FAILING: Final = frozenset({"ENOSPC", "ENOMEM", "EIO"})
# Replies up to this size use C's built-in buffer and are never refused for memory.
_REPLY_BUFFER: Final = 16


class XenstoreEngine(XenstoreState):
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
        super().__init__(quotas, audit=audit, clock=clock)
        # handle_fast's outbox (empty between requests) and its context (never audited)
        self._fast_out = Outbox()
        self._fast_req = Request()

    def _lookup(self, conn: Connection, packet: Packet, req: Request) -> Transaction | None:
        """C process_message()'s checks before the handler: the transaction it names."""
        spec = OPS.get(packet.op)
        if spec is None:
            raise XsErrno("ENOSYS")
        if spec.privileged and not conn.privileged:
            req.rule = "privileged-only"
            raise XsErrno("EACCES")
        if packet.tx_id and spec.transactional:
            txn = conn.transactions.get(packet.tx_id)
            if txn is None:
                raise XsErrno("ENOENT")
            return txn
        return None

    def handle(self, conn_id: int, packet: Packet) -> Outbox:
        """Process one request and return every message it causes, in sending order."""
        conn = self.conns[conn_id]
        out = Outbox()
        op = packet.op
        req = Request()
        txn: Transaction | None = None
        try:
            txn = self._lookup(conn, packet, req)
            payload = OPS[op].handler(self, req, conn, packet, txn, out)
            n = len(payload)
            if n > PAYLOAD_MAX:
                raise XsErrno("E2BIG")
            if n > _REPLY_BUFFER and not conn.privileged and self.over_memory(conn.domid, n):
                # C send_reply: a reply buffer over the memory quota becomes ENOMEM; the
                # transaction is not failed by it.
                result = "ENOMEM"
                payload = errno_payload(result)
                out.append((conn_id, Packet(_ERROR, packet.req_id, packet.tx_id, payload)))
            else:
                out.append((conn_id, Packet(op, packet.req_id, packet.tx_id, payload)))
                result = "OK"
        except XsErrno as exc:
            result = exc.errno_name
            if (
                txn is not None
                and result in _TX_FAILING
                and op != _TRANSACTION_END
                and exc.fails_transaction
            ):
                txn.failed = True
            out.append(
                (conn_id, Packet(_ERROR, packet.req_id, packet.tx_id, errno_payload(result)))
            )
        after = req.after  # set by WATCH only, as its last step
        if after is not None:
            out.append(after)
        audit = self.audit
        if audit is not None:
            audit.append(self.record(conn, packet.op_name, packet.tx_id, result, req))
        return out

    def handle_fast(self, conn_id: int, packet: Packet) -> bytes | Outbox | None:
        """:meth:`handle` for the common requests, with less work per request.

        A privileged READ, WRITE or DIRECTORY outside a transaction, with auditing off, runs
        the same handler as :meth:`handle`; its reply comes back encoded, ready to send, when
        it causes no other message, else as the :class:`Outbox` :meth:`handle` would return.
        None: any other request; call :meth:`handle`.
        """
        conn = self.conns[conn_id]
        op = packet.op
        if op not in FAST_OPS or packet.tx_id or not conn.privileged or self.audit is not None:
            return None
        out = self._fast_out
        try:
            payload = OPS[op].handler(self, self._fast_req, conn, packet, None, out)
            if len(payload) > PAYLOAD_MAX:
                raise XsErrno("E2BIG")
        except XsErrno as exc:
            op = _ERROR
            payload = errno_payload(exc.errno_name)
        except BaseException:
            self._fast_out = Outbox()  # drop what the failed request queued
            raise
        if (
            out
        ):  # watch events go before the reply (docs/xenstore.md, 'Reply headers and event order')
            self._fast_out = Outbox()
            out.append((conn_id, Packet(op, packet.req_id, 0, payload)))
            return out
        return HEADER.pack(op, packet.req_id, 0, len(payload)) + payload

    def answer_fast(
        self, conn_id: int, decoder: PacketDecoder, out: OutQueue
    ) -> Packet | Outbox | NeedData | None:
        """Answer the requests waiting in ``decoder`` straight into ``out``, for as long as
        each causes nothing but replies to this connection: the shell's work per request then
        stays in compiled code.  Privileged READ, WRITE and DIRECTORY take
        :meth:`handle_fast`, the others :meth:`handle`.

        Returns what the shell must do next:

        * NEED_DATA: no whole request is left.
        * a :class:`Packet`: a request this lane leaves alone (CONTROL, any request while
          auditing, or any once ``out`` is full and the shell must hold it), for
          :meth:`handle`.
        * an :class:`Outbox`: the last request's messages, which go beyond replies to this
          connection (watch events, other connections, domains opened or closed); route it.
        * None: ``out`` went over its bounds; the shell closes the connection.

        A malformed header raises :class:`~xenstored_sim.wire.RemoteProtocolError` as
        :meth:`PacketDecoder.next_packet` does.
        """
        if conn_id not in self.conns:
            return decoder.next_packet()
        while True:
            packet = decoder.next_packet()
            if not isinstance(packet, Packet):
                return packet
            if out.full():
                return packet
            reply = self.handle_fast(conn_id, packet)
            if reply is None:
                if packet.op == _CONTROL or self.audit is not None:
                    return packet  # live update is the shell's; audit records are flushed there
                replies = self.handle(conn_id, packet)
                if not _own_replies(conn_id, replies):
                    return replies
                for _, message in replies:
                    if not out.push(encode(message)):
                        return None
            elif not isinstance(reply, bytes):
                return reply
            elif not out.push(reply):
                return None


def _own_replies(conn_id: int, out: Outbox) -> bool:
    """``out`` holds replies to ``conn_id`` and nothing else for the shell to do."""
    if out.introduced or out.released or out.closed:
        return False
    return all(target == conn_id and message.op != _WATCH_EVENT for target, message in out)

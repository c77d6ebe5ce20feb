"""Matching replies to requests by ``req_id``, without I/O.

The daemon echoes each request's ``req_id`` in its reply (C ``send_reply``; docs/xenstore.md, 'Reply
headers and event order'), so a client may keep many requests outstanding on one connection.
:class:`ReplyMatcher` is the bookkeeping of jeepney's ``io/common.py`` for that: a waiter is
registered *before* its request is written (the daemon may answer before the writer returns), a
reply goes to exactly one waiter, and when the connection goes away every waiter is failed, so none
is left waiting (pyxs's reader thread dies on an unknown reply and leaves its callers waiting).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar, final

from ..wire import Packet, RemoteProtocolError

__all__ = ["ReplyMatcher", "UnexpectedReply", "Waiter"]

#: ``req_id`` is a ``uint32_t`` (xs_wire.h ``struct xsd_sockmsg``).
_REQ_ID_LIMIT = 1 << 32


class Waiter(Protocol):
    """Whatever waits for one reply: it gets the reply, or the reason there will be none."""

    def deliver(self, packet: Packet) -> None: ...

    def fail(self, reason: BaseException) -> None: ...


W = TypeVar("W", bound=Waiter)


class UnexpectedReply(RemoteProtocolError):
    """A reply whose ``req_id`` no request is waiting for: the daemon broke the protocol."""


@final
class ReplyMatcher(Generic[W]):
    """``req_id`` -> waiter.

    Request ids count up from 1 per connection, wrap at 2**32 and skip ids still in use.
    A caller that gives up on a request it already sent calls :meth:`abandon` with
    ``reply_due=True``: its reply is still consumed when it arrives, and not mistaken for a
    protocol violation.
    """

    __slots__ = ("_abandoned", "_closed_reason", "_next_id", "_waiters")

    def __init__(self) -> None:
        self._waiters: dict[int, W] = {}
        self._abandoned: set[int] = set()
        self._next_id = 1
        self._closed_reason: BaseException | None = None

    def __len__(self) -> int:
        """The number of waiters."""
        return len(self._waiters)

    @property
    def closed_reason(self) -> BaseException | None:
        """Why the connection went away, once :meth:`drop_all` has been called."""
        return self._closed_reason

    def next_req_id(self) -> int:
        """A ``req_id`` that no outstanding request uses."""
        if len(self._waiters) + len(self._abandoned) >= _REQ_ID_LIMIT - 1:
            raise RuntimeError("every req_id is in use")
        while True:
            req_id = self._next_id
            self._next_id = req_id + 1 if req_id + 1 < _REQ_ID_LIMIT else 1
            if req_id not in self._waiters and req_id not in self._abandoned:
                return req_id

    def expect(self, req_id: int, waiter: W) -> None:
        """Register ``waiter`` for the reply to ``req_id``; a closed matcher fails it at once."""
        if req_id in self._waiters or req_id in self._abandoned:
            raise ValueError(f"req_id {req_id} is already in use")
        if self._closed_reason is not None:
            waiter.fail(self._closed_reason)
            return
        self._waiters[req_id] = waiter

    def abandon(self, req_id: int, *, reply_due: bool) -> None:
        """Forget the waiter of ``req_id``; if the request went out, swallow its reply later."""
        waiter = self._waiters.pop(req_id, None)
        if waiter is not None and reply_due and self._closed_reason is None:
            self._abandoned.add(req_id)

    def dispatch(self, packet: Packet) -> W | None:
        """Hand a reply to its waiter and return that waiter (None for an abandoned request).

        Raises:
            UnexpectedReply: nobody sent a request with this ``req_id``.
        """
        waiter = self._waiters.pop(packet.req_id, None)
        if waiter is None:
            if packet.req_id in self._abandoned:
                self._abandoned.discard(packet.req_id)
                return None
            raise UnexpectedReply(f"{packet.op_name} reply to unknown req_id {packet.req_id}")
        waiter.deliver(packet)
        return waiter

    def drop_all(self, reason: BaseException) -> list[W]:
        """Fail every waiter with ``reason``; later :meth:`expect` calls fail at once."""
        if self._closed_reason is None:
            self._closed_reason = reason
        waiters = list(self._waiters.values())
        self._waiters.clear()
        self._abandoned.clear()
        for waiter in waiters:
            waiter.fail(reason)
        return waiters

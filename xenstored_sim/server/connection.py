"""One client connection's trio side: the task that holds it open, and its expirer.

The socket work (reading, answering, sending, the queue's bounds) is :class:`~.conn_io.ConnIO`,
served by the daemon's main loop (:mod:`.poller`).  This shell adds what needs trio:

* :meth:`ClientConnection.run`, the task that lives as long as the connection, after which the
  daemon disconnects it from the engine and the socket is closed;
* on a guest connection, the expirer task, which discards events left unsent past the
  watch-event timeout (20 s by default, C's ``--timeout watch-event=``; XSA-326).

Why raw non-blocking sockets and one poll rather than trio streams and a task per
connection: see docs/architecture.md, 'xenstored-sim: the connection shell'.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from ..core.outqueue import PRIVILEGED_OUTSTANDING, OutQueue
from ..core.request import Outbox
from ..wire import Packet
from .conn_io import READ, ConnIO, FastLane, Reactor

__all__ = ["PRIVILEGED_OUTSTANDING", "ClientConnection"]


class ClientConnection:
    """The trio side of one engine connection over a non-blocking stream socket.

    The connection owns ``sock`` and closes it when :meth:`run` returns.  ``fast_lane`` is
    the engine's, or None if every request must take ``dispatch``; ``deliver`` routes the
    outbox of a request the fast lane answered with watch events.
    """

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        reactor: Reactor,
        fast_lane: FastLane | None,
        deliver: Callable[[Outbox], None],
        dispatch: Callable[[int, Packet], None],
        limit: Callable[[], int],
        *,
        event_timeout: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self._sock = sock
        self._reactor = reactor
        self._done = trio.Event()
        self._have_deadline = trio.Event()
        out = OutQueue(limit, event_timeout)
        self.io = io = ConnIO(
            conn_id, sock, out, reactor, fast_lane, deliver, dispatch, self._done.set
        )
        #: Queue an encoded message; outside a request of this connection, :meth:`flush`
        #: sends it.
        self.push: Callable[[bytes], None] = io.push
        #: Send what one request queued here (ConnIO.flush).
        self.flush: Callable[[], None] = io.flush

    @property
    def closed(self) -> bool:
        return self.io.closed or self._done.is_set()

    def push_event(self, data: bytes) -> None:
        """Queue an encoded watch event, unless the queue's rules drop it (C ``send_event``)."""
        if self.io.out.event_timeout is None:
            self.io.push_event(data)
        else:
            self.io.push_event(data, trio.current_time())
            self._have_deadline.set()

    @property
    def unsent(self) -> int:
        """Messages queued and not wholly sent."""
        return len(self.io.out)

    def adopt(self, unread: bytes, unsent: bytes) -> None:
        """Take over the bytes a live update carried: input still to handle, output still
        to send (server/live_update.py).  Call before :meth:`run`."""
        if unread:
            self.io.decoder.receive_data(unread)
        if unsent:
            self.io.out.adopt(unsent)

    def pending_input(self) -> bytes:
        """Received bytes not yet handled, in order."""
        return self.io.pending_input()

    def pending_output(self) -> bytes:
        """Queued bytes not yet sent, in order."""
        return self.io.out.pending()

    def fileno(self) -> int:
        return self.io.fd

    def close(self) -> None:
        """Stop serving; the socket is closed on the way out of :meth:`run`."""
        self.io.close()

    async def run(self) -> None:
        """Serve until the client hangs up, breaks the protocol or is closed."""
        io = self.io
        try:
            async with trio.open_nursery() as nursery:
                if io.out.event_timeout is not None:
                    nursery.start_soon(self._expirer)
                if not io.closed:
                    self._reactor.register(io, READ)
                    if io.decoder.buffered:  # input a live update carried over comes first
                        io.serve_input()
                    elif io.out:
                        io.send()
                    await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            io.close()  # a no-op unless cancelled from outside
            self._sock.close()

    async def _expirer(self) -> None:
        """Discard guest events left unread past the watch-event timeout (XSA-326)."""
        io = self.io
        out = io.out
        while True:
            deadline = out.next_deadline()
            if deadline is None:
                self._have_deadline = trio.Event()
                await self._have_deadline.wait()
                continue
            await trio.sleep_until(deadline)
            out.expire(trio.current_time())
            if io.held and not out.full():
                io.serve_input()  # the expired events made room for the held request
            else:
                io.update()

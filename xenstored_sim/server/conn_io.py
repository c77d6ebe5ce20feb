"""The socket work of the main loop, without trio: C xenstored's ``handle_input()`` and
``handle_output()`` (tools/xenstored/core.c) for every ready connection.

Theory of operation.  :class:`Reactor` is the epoll set of the client sockets
(level-triggered) and what each is waiting for; :meth:`Reactor.serve` hands every ready socket
to its :class:`ConnIO`.  When its socket is readable, a :class:`ConnIO` takes what one
``recv`` returns (often several requests) and answers them: a request that causes only
replies to this connection is answered straight into its queue by the engine's fast lane
(:meth:`~xenstored_sim.core.XenstoreEngine.answer_fast`); the outbox of any other is routed by
the daemon (``deliver``: each message to the queue of the connection it is for), and CONTROL
goes to the daemon's ``dispatch``.  Then it sends its queue with one non-blocking ``send``: one read and one
send per batch, the way C answers everything it has read before it polls again.  Messages
queued by *other* connections' requests (watch events) are sent once that request's whole
outbox is queued (:meth:`ConnIO.flush`).  Whatever the kernel does not take at once waits in
the queue, and the connection waits for its socket to be writable.  The queue holds every
unsent byte, so output is never reordered.

The queue's policy (its bounds, duplicate watch events, expiry of unread guest events) is the
sans-IO :class:`~xenstored_sim.core.outqueue.OutQueue`; this module applies its verdicts.
Nothing a connection does can block another:

* A client that sends but never reads fills only its own queue.  Before each request the
  connection checks that the queue has room (``limit`` unsent messages): the ``outstanding``
  quota for guests (C stops reading a guest's ring the same way, docs/xenstore.md, 'Quotas'), a
  larger bound for privileged sockets.  While it has none, the request is held and the socket
  is not read.
* Watch events caused by *other* connections cannot wait: a queue over its bounds means the
  client is not reading at all, and the connection is closed.
* A header announcing more than 4096 bytes is a protocol violation: the connection is
  dropped without a reply (docs/xenstore.md, 'Wire format').

This module imports no trio, so that it is compiled with the core (xenstored_sim/compiled.py):
it runs for every request.  Its trio shell, which waits and holds each connection open, is
:mod:`.poller` and :mod:`.connection`.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable
from typing import Final

from ..core.outqueue import MESSAGE_MAX, OutQueue
from ..core.request import Outbox
from ..wire import NEED_DATA, NeedData, Packet, PacketDecoder, RemoteProtocolError, encode

log = logging.getLogger("xenstored_sim.server")

#: Interest masks.
READ: Final = select.EPOLLIN
WRITE: Final = select.EPOLLOUT
# At most one whole frame per read.  Besides bounding each batch, this leaves the rest of an
# oversized frame unread in the kernel when we close, so the peer sees a connection reset, as
# with C, which reads the header and payload separately.
_RECEIVE_SIZE: Final = MESSAGE_MAX

#: The engine's fast lane (XenstoreEngine.answer_fast), or None when every request must take
#: ``dispatch`` (a state directory or a trace file must see each reply).
FastLane = Callable[[int, PacketDecoder, OutQueue], "Packet | Outbox | NeedData | None"]


class Reactor:
    """The epoll set of the client sockets, and which :class:`ConnIO` each belongs to."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self._conns: dict[int, ConnIO] = {}
        self._masks: dict[int, int] = {}

    def register(self, conn: ConnIO, mask: int) -> None:
        fd = conn.fd
        self.epoll.register(fd, mask)
        self._conns[fd] = conn
        self._masks[fd] = mask

    def modify(self, fd: int, mask: int) -> None:
        """Change what ``fd`` waits for; a no-op when unchanged or no longer registered."""
        old = self._masks.get(fd)
        if old is not None and old != mask:
            self.epoll.modify(fd, mask)
            self._masks[fd] = mask

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); a no-op if not registered."""
        if self._conns.pop(fd, None) is not None:
            del self._masks[fd]
            if not self.epoll.closed:
                self.epoll.unregister(fd)

    def serve_rounds(self, rounds: int, max_events: int) -> bool:
        """Poll without blocking and serve what is ready, up to ``rounds`` times in a row.
        True if every poll found something (the caller then lets other work run), False
        once one found nothing (the caller waits)."""
        epoll = self.epoll
        for _ in range(rounds):
            events = epoll.poll(0, max_events)
            if not events:
                return False
            self.serve(events)
        return True

    def serve(self, events: list[tuple[int, int]]) -> None:
        """Serve each ready connection in turn."""
        conns = self._conns
        for fd, mask in events:
            conn = conns.get(fd)  # gone if an earlier one in this round closed it
            if conn is None:
                continue
            try:
                conn.ready(mask)
            except Exception:
                # A bug must not take the daemon down: this client alone is dropped.
                log.exception("serving connection %d failed", conn.conn_id)
                conn.close()

    def close(self) -> None:
        self.epoll.close()


class ConnIO:
    """One client socket: its input, its output queue, its requests.

    ``done`` is called once, when the connection is closed or, after the client hung up,
    once everything is sent; the reactor has forgotten the socket by then, and the owner
    closes it.
    """

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        out: OutQueue,
        reactor: Reactor,
        fast_lane: FastLane | None,
        deliver: Callable[[Outbox], None],
        dispatch: Callable[[int, Packet], None],
        done: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self.conn_id = conn_id
        self.fd = sock.fileno()
        self.out = out
        self.decoder = PacketDecoder()
        self.closed = False
        #: The client has hung up (or its input ended): no more reading.
        self.eof = False
        #: Everything is sent after the hang-up.
        self.finished = False
        self._sock = sock
        self._reactor = reactor
        self._fast_lane = fast_lane
        self._deliver = deliver
        self._dispatch = dispatch
        self._done = done
        # A request taken from the decoder while the queue has no room for its replies.
        self._held: Packet | None = None
        # While a batch is handled, the replies are sent after it: pushes need not send.
        self._in_batch = False

    # ------------------------------------------------------------ the daemon's calls

    def push(self, data: bytes) -> None:
        """Queue an encoded message; never blocks.  Outside a batch, :meth:`flush` sends it."""
        if not self.closed and not self.out.push(data):
            self.close()

    def push_event(self, data: bytes, now: float = 0.0) -> None:
        """Queue an encoded watch event (at time ``now``, for the expiry of guest events),
        unless the queue's rules drop it (C ``send_event``)."""
        if not self.closed and not self.out.push_event(data, now):
            self.close()

    def flush(self) -> None:
        """Send what one request queued here, unless this connection is the one being served
        (it sends after the batch).  Called once the request's whole outbox is queued:
        C queues every event of a request (and drops identical unsent ones) before its main
        loop writes any connection's out_list, and writes them all before the requester can
        send again (tools/xenstored/core.c: main(), handle_output()).  Left queued longer, a
        later request's identical event would be dropped where C delivers it."""
        if not self._in_batch and self.out and not self.closed:
            self.send()

    def pending_input(self) -> bytes:
        """Received bytes not yet handled, in order."""
        held = self._held
        rest = self.decoder.unread()
        return rest if held is None else encode(held) + rest

    def close(self) -> None:
        """Stop serving: drop the queue and leave the reactor.  The socket stays open."""
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self._reactor.forget(self.fd)
        self._done()

    # ------------------------------------------------------------------- the loop's calls

    def ready(self, events: int) -> None:
        """The socket can be read and/or written (``events``, an epoll mask)."""
        if self.closed:
            return
        if events & WRITE or self._held is not None:
            self.send()
            if self._held is not None and not self.closed and not self.out.full():
                self.serve_input()
        # anything but writable (readable, hung up, an error) is for the reader
        if events & ~WRITE and self._held is None and not self.eof and not self.closed:
            try:
                data = self._sock.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self.decoder.receive_data(data)
                self.serve_input()
            else:
                self.eof = True  # the client is gone: send what is queued, then finish
                self.update()

    def serve_input(self) -> None:
        """Handle every whole request received (or held), then send the replies."""
        out = self.out
        conn_id = self.conn_id
        while True:
            packet = self._held
            if packet is None:
                self._in_batch = True
                try:
                    got = self._next_request()
                except RemoteProtocolError:
                    # no reply: C closes the socket at once (docs/xenstore.md, 'Wire format')
                    self.close()
                    return
                finally:
                    self._in_batch = False
                if got is NEED_DATA:
                    break
                if got is None or self.closed:
                    self.close()  # over its bounds (or closed by a request it caused)
                    return
                assert isinstance(got, Packet)
                packet = got
            if out.full() and (not self._send_now() or out.full()):
                if self.closed:
                    return
                self._held = packet  # until the client reads enough of its replies
                break
            self._held = None
            self._in_batch = True
            try:
                self._dispatch(conn_id, packet)
            finally:
                self._in_batch = False
            if self.closed:
                return
        self.send()

    def send(self) -> None:
        """Send as much of the queue as the kernel takes now, and wait for the socket to be
        writable while anything is left (closing the connection if the socket broke)."""
        if self._send_now():
            self.update()

    def update(self) -> None:
        """Tell the reactor what this connection waits for; finish after a hang-up once
        everything is sent."""
        if self.closed:
            return
        if self.eof and not self.out:
            if not self.finished:
                self.finished = True
                self._reactor.forget(self.fd)
                self._done()
            return
        mask = WRITE if self.out else 0
        if self._held is None and not self.eof:
            mask |= READ
        self._reactor.modify(self.fd, mask)

    @property
    def held(self) -> bool:
        """A request waits for room in the queue."""
        return self._held is not None

    # ------------------------------------------------------------------ internals

    def _next_request(self) -> Packet | NeedData | None:
        """The next request for ``dispatch``, after the fast lane has answered those before
        it; NEED_DATA when none is left, None if the queue went over its bounds."""
        lane = self._fast_lane
        if lane is None:
            return self.decoder.next_packet()
        while True:
            got = lane(self.conn_id, self.decoder, self.out)
            if not isinstance(got, Outbox):
                return got
            self._deliver(got)  # the request also caused watch events

    def _send_now(self) -> bool:
        """Send as much of the queue as the kernel takes now; False if the socket broke (the
        connection is then closed)."""
        out = self.out
        if out:
            try:
                sent = self._sock.send(out.pending())
            except BlockingIOError:
                return True
            except OSError:
                self.close()
                return False
            out.sent(sent)
        return True

"""One client connection: a reader task and a writer task around its output queue.

Theory of operation.  The reader waits until the socket is readable, takes what one
``recv`` returns (often several requests), hands each request to the daemon, which runs the
engine and pushes every resulting message to the queue of the connection it is for, and then
sends its own queue with one non-blocking ``send``: one wake-up and one send per batch, the
way C answers everything it has read before it polls again.  It then tries the socket once
more before waiting (:data:`_EAGER_READS`): a client on the same CPU usually has its next
request written by the time ``send`` returns, and the poll and task switch are skipped.
Whatever the kernel does not take at once, and messages queued by *other* connections'
requests (watch events), go out through the writer task, which waits for the socket to
become writable.  The queue holds every unsent byte, so the two senders never reorder output.

The queue's policy (its bounds, duplicate watch events, expiry of unread guest events) is the
sans-IO :class:`~xenstored_sim.core.outqueue.OutQueue`; this shell applies its verdicts.
Nothing a connection does can block another:

* A client that sends but never reads fills only its own queue.  Before each request the
  reader waits while the queue is full (``limit`` unsent messages): the ``outstanding`` quota
  for guests (C stops reading a guest's ring the same way, docs/xenstore.md, 'Quotas'), a larger
  bound for privileged sockets.
* Watch events caused by *other* connections cannot wait: a queue over its bounds means the
  client is not reading at all, and the connection is closed.
* A header announcing more than 4096 bytes is a protocol violation: the connection is
  dropped without a reply (docs/xenstore.md, 'Wire format').
* On a guest connection, the expirer task discards events left unsent past the watch-event
  timeout (20 s by default, C's ``--timeout watch-event=``; XSA-326).

Why raw non-blocking sockets and ``trio.lowlevel.wait_readable``/``wait_writable`` rather than
trio streams: see docs/architecture.md, 'xenstored-sim: the connection shell'.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final

import trio

from ..core.outqueue import MESSAGE_MAX, PRIVILEGED_OUTSTANDING, OutQueue
from ..wire import NEED_DATA, Packet, PacketDecoder, RemoteProtocolError, encode

__all__ = ["PRIVILEGED_OUTSTANDING", "ClientConnection"]

# At most one whole frame per read.  Besides bounding each batch, this leaves the rest of an
# oversized frame unread in the kernel when we close, so the peer sees a connection reset, as
# with C, which reads the header and payload separately.
_RECEIVE_SIZE: Final = MESSAGE_MAX
# After a reply, the next request is often there already: the client ran on the same CPU
# when the send woke it.  Up to this many reads in a row try the socket before waiting for
# it, skipping the poll and the task switch; then the task waits, so others get their turn.
_EAGER_READS: Final = 8


class ClientConnection:
    """The I/O side of one engine connection over a non-blocking stream socket.

    The connection owns ``sock`` and closes it when :meth:`run` returns.
    """

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        dispatch: Callable[[int, Packet], None],
        limit: Callable[[], int],
        *,
        event_timeout: float | None = None,
    ) -> None:
        sock.setblocking(False)
        self.conn_id = conn_id
        self._sock = sock
        self._dispatch = dispatch
        self._out = OutQueue(limit, event_timeout)
        self._have_deadline = trio.Event()
        self._decoder = PacketDecoder()
        # A request taken from the decoder while the reader waits for room in the queue.
        self._held: Packet | None = None
        # While the reader handles a batch it sends the replies itself afterwards: pushes
        # then need not wake the writer.
        self._in_batch = False
        self._have_data = trio.Event()
        self._have_room = trio.Event()
        self._cancel = trio.CancelScope()
        self.closed = False

    def push(self, data: bytes) -> None:
        """Queue an encoded message; never blocks."""
        if self.closed:
            return
        if not self._out.push(data):
            self.close()
        elif not self._in_batch:
            self._have_data.set()

    def push_event(self, data: bytes) -> None:
        """Queue an encoded watch event, unless the queue's rules drop it (C ``send_event``)."""
        if self.closed:
            return
        out = self._out
        if out.event_timeout is None:
            accepted = out.push_event(data)
        else:
            accepted = out.push_event(data, trio.current_time())
            self._have_deadline.set()
        if not accepted:
            self.close()
        elif not self._in_batch:
            self._have_data.set()

    def flush(self) -> None:
        """Send what one request queued here, unless this connection is the one being served
        (its reader sends after the batch).  Called once the request's whole outbox is queued:
        C queues every event of a request (and drops identical unsent ones) before its main
        loop writes any connection's out_list, and writes them all before the requester can
        send again (tools/xenstored/core.c: main(), handle_output()).  Left queued longer, a
        later request's identical event would be dropped where C delivers it."""
        if not self._in_batch and len(self._out) and self._send_queued() >= 0 and len(self._out):
            self._have_data.set()

    @property
    def unsent(self) -> int:
        """Messages queued and not wholly sent."""
        return len(self._out)

    def adopt(self, unread: bytes, unsent: bytes) -> None:
        """Take over the bytes a live update carried: input still to handle, output still
        to send (server/live_update.py).  Call before :meth:`run`."""
        if unread:
            self._decoder.receive_data(unread)
        if unsent:
            self._out.adopt(unsent)
            self._have_data.set()

    def pending_input(self) -> bytes:
        """Received bytes not yet handled, in order."""
        held = self._held
        rest = self._decoder.unread()
        return rest if held is None else encode(held) + rest

    def fileno(self) -> int:
        return self._sock.fileno()

    def pending_output(self) -> bytes:
        """Queued bytes not yet sent, in order."""
        return self._out.pending()

    def close(self) -> None:
        """Stop both tasks; the connection's socket is closed on the way out."""
        self.closed = True
        self._out.clear()
        self._cancel.cancel()

    async def run(self) -> None:
        """Serve until the client hangs up, breaks the protocol or is closed."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    if self._out.event_timeout is not None:
                        nursery.start_soon(self._expirer)
                    await self._reader()
                    # Let the writer flush what is queued, then stop it.
                    while self._out and not self.closed:
                        self._have_data.set()
                        self._have_room = trio.Event()
                        await self._have_room.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            # Both tasks are gone: nothing waits on the descriptor any more.
            self._sock.close()

    def _send_queued(self) -> int:
        """Send as much of the queue as the kernel takes now.  Returns the bytes sent, or -1
        if the socket broke (the connection is then closed)."""
        out = self._out
        try:
            sent = self._sock.send(out.pending())
        except BlockingIOError:
            return 0
        except OSError:
            self.close()
            return -1
        out.sent(sent)
        return sent

    def _recv_now(self) -> bytes | None:
        """One non-blocking read: the bytes, ``b""`` if none are there yet, or None at the
        end of the stream or on an error."""
        try:
            data = self._sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        return data or None

    async def _expirer(self) -> None:
        """Discard guest events left unread past the watch-event timeout (XSA-326)."""
        out = self._out
        while True:
            deadline = out.next_deadline()
            if deadline is None:
                self._have_deadline = trio.Event()
                await self._have_deadline.wait()
                continue
            await trio.sleep_until(deadline)
            out.expire(trio.current_time())
            if out:
                self._have_room.set()

    async def _wait_for_room(self, packet: Packet) -> bool:
        """Hold ``packet`` until the queue has room for its replies; False if the socket
        broke meanwhile."""
        if self._send_queued() < 0:
            return False
        self._held = packet
        out = self._out
        while out.full():
            self._have_data.set()
            self._have_room = trio.Event()
            await self._have_room.wait()
        self._held = None
        return True

    async def _reader(self) -> None:
        decoder = self._decoder
        fd = self._sock.fileno()
        out = self._out
        dispatch = self._dispatch
        conn_id = self.conn_id
        adopted = decoder.buffered > 0  # input a live update carried over comes first
        eager = 0  # reads left that may skip the wait (see _EAGER_READS)
        while True:
            if adopted:
                adopted = False
            else:
                data: bytes | None = b""
                if eager:
                    eager -= 1
                    data = self._recv_now()
                    if data is None:
                        return
                    if not data:
                        eager = 0
                if not data:
                    await trio.lowlevel.wait_readable(fd)
                    eager = _EAGER_READS
                    data = self._recv_now()
                    if data is None:
                        return
                    if not data:
                        continue
                decoder.receive_data(data)
            while True:
                try:
                    packet = decoder.next_packet()
                except RemoteProtocolError:
                    # no reply: C closes the socket at once (docs/xenstore.md, 'Wire format')
                    self.close()
                    return
                if packet is NEED_DATA:
                    break
                assert isinstance(packet, Packet)
                if out.full() and not await self._wait_for_room(packet):
                    return
                self._in_batch = True
                try:
                    dispatch(conn_id, packet)
                finally:
                    self._in_batch = False
                if self.closed:
                    return
            if out and self._send_queued() < 0:
                return
            if out:
                self._have_data.set()  # the kernel is full: the writer waits for room

    async def _writer(self) -> None:
        sock = self._sock
        out = self._out
        while True:
            if not out:
                self._have_data = trio.Event()
                await self._have_data.wait()
                continue
            sent = self._send_queued()
            if sent < 0:
                return
            if sent:
                self._have_room.set()
            if out:
                await trio.lowlevel.wait_writable(sock)

"""One client connection: a reader task and a writer task around a bounded output queue.

Theory of operation.  The reader waits until the socket is readable, takes what one
``recv`` returns (often several requests), hands each request to the daemon, which runs the
engine and pushes every resulting message to the queue of the connection it is for, and then
sends its own queue with one non-blocking ``send``: one wake-up and one send per batch, the
way C answers everything it has read before it polls again.  It then tries the socket once
more before waiting (:data:`_EAGER_READS`): a client on the same CPU usually has its next
request written by the time ``send`` returns, and the poll and task switch are skipped.  Whatever the kernel does not
take at once, and messages queued by *other* connections' requests (watch events), go out
through the writer task, which waits for the socket to become writable.  The queue holds
every unsent byte, so the two senders never reorder output.  Nothing a connection does can
block another:

* A client that sends but never reads fills only its own queue.  Before each request the
  reader waits while the queue holds ``limit`` unsent messages: the ``outstanding`` quota
  for guests (C stops reading a guest's ring the same way, docs/xenstore.md, 'Quotas'), a larger
  bound for privileged sockets.
* Watch events caused by *other* connections cannot wait.  If a queue ever holds more than
  :data:`BACKLOG_MAX` messages, or more bytes than :data:`BACKLOG_SLOTS_MIN` (or ``limit``,
  if larger) messages of the largest size, the client is not reading at all, and the
  connection is closed rather than letting memory grow.  The byte bound matters for guests:
  a guest's own writes can queue large events on its other, unread connections (XSA-326).
* A header announcing more than 4096 bytes is a protocol violation: the connection is
  dropped without a reply (docs/xenstore.md, 'Wire format').

Watch events get two more rules of C's ``send_event`` (docs/xenstore.md, 'Watch events and the send
queue', XSA-326).  A non-special event identical to one still queued and unsent is dropped.  On a
guest connection an event still wholly unsent after the watch-event timeout (20 s by default, C's
``--timeout watch-event=``) is discarded.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from ..wire import (
    HEADER_SIZE,
    NEED_DATA,
    PAYLOAD_MAX,
    Packet,
    PacketDecoder,
    RemoteProtocolError,
    encode,
)

#: Unsent messages a privileged connection may accumulate before its reader pauses.
PRIVILEGED_OUTSTANDING: Final = 1024
#: Unsent messages after which a connection is considered dead and closed.
BACKLOG_MAX: Final = 16384
#: The byte backlog of a connection is bounded to at least this many maximum-size messages.
BACKLOG_SLOTS_MIN: Final = 64

# At most one whole frame per read.  Besides bounding each batch, this leaves the rest of an
# oversized frame unread in the kernel when we close, so the peer sees a connection reset, as
# with C, which reads the header and payload separately.
_RECEIVE_SIZE: Final = HEADER_SIZE + PAYLOAD_MAX
# After a reply, the next request is often there already: the client ran on the same CPU
# when the send woke it.  Up to this many reads in a row try the socket before waiting for
# it, skipping the poll and the task switch; then the task waits, so others get their turn.
_EAGER_READS: Final = 8
# Below this many queued bytes no connection is over its byte bound.
_BYTES_MIN: Final = _RECEIVE_SIZE * BACKLOG_SLOTS_MIN


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
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        # Queued, wholly unsent watch events (encoded) -> how many (docs/xenstore.md, 'Watch events
        # and the send queue').
        self._unsent_events: dict[bytes, int] = {}
        # Seconds an event may wait unsent (guests only), and (deadline, event) in order.
        self._event_timeout = event_timeout
        self._deadlines: deque[tuple[float, bytes]] = deque()
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
        queue = self._queue
        queue.append(data)
        queued = self._queued_bytes = self._queued_bytes + len(data)
        if len(queue) > BACKLOG_MAX or (
            queued > _BYTES_MIN and queued > _RECEIVE_SIZE * max(self._limit(), BACKLOG_SLOTS_MIN)
        ):
            self.close()
            return
        if not self._in_batch:
            # Output for a connection other than the one being served (a watch event) goes
            # out now, as C's main loop writes every connection's out_list before it reads the
            # next request (tools/xenstored/core.c: main(), handle_output()); left queued, it
            # would make C's duplicate check drop a later identical event that C delivers.
            if self._send_queued() >= 0 and queue:
                self._have_data.set()

    def push_event(self, data: bytes) -> None:
        """Queue an encoded watch event, unless an identical non-special one is still
        queued and unsent (C ``send_event``)."""
        if self.closed:
            return
        unsent = self._unsent_events
        count = unsent.get(data)
        if count:
            if data[HEADER_SIZE : HEADER_SIZE + 1] != b"@":
                return
            unsent[data] = count + 1
        else:
            unsent[data] = 1
        if self._event_timeout is not None:
            self._deadlines.append((trio.current_time() + self._event_timeout, data))
            self._have_deadline.set()
        self.push(data)

    @property
    def unsent(self) -> int:
        """Messages queued and not wholly sent."""
        return len(self._queue)

    def adopt(self, unread: bytes, unsent: bytes) -> None:
        """Take over the bytes a live update carried: input still to handle, output still
        to send (server/live_update.py).  Call before :meth:`run`."""
        if unread:
            self._decoder.receive_data(unread)
        if unsent:
            self._queue.append(unsent)
            self._queued_bytes += len(unsent)
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
        return b"".join(self._queue)

    def close(self) -> None:
        """Stop both tasks; the connection's socket is closed on the way out."""
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._unsent_events.clear()
        self._deadlines.clear()
        self._cancel.cancel()

    async def run(self) -> None:
        """Serve until the client hangs up, breaks the protocol or is closed."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    if self._event_timeout is not None:
                        nursery.start_soon(self._expirer)
                    await self._reader()
                    # Let the writer flush what is queued, then stop it.
                    while self._queue and not self.closed:
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
        queue = self._queue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close()
            return -1
        if sent == len(data):
            queue.clear()
            self._queued_bytes = 0
            if self._unsent_events:
                self._unsent_events.clear()
            return sent
        # The queue keeps one entry per unsent message: ``limit`` counts messages.
        self._queued_bytes -= sent
        left = sent
        unsent = self._unsent_events
        while left:
            head = queue[0]
            if unsent:
                count = unsent.get(head)
                if count == 1:
                    del unsent[head]
                elif count:
                    unsent[head] = count - 1
            if len(head) <= left:
                queue.popleft()
                left -= len(head)
            else:
                queue[0] = head[left:]  # partly sent: no longer a candidate to drop
                left = 0
        return sent

    def _expire(self, event: bytes) -> None:
        """Discard ``event`` if that very message is still queued and wholly unsent."""
        queue = self._queue
        for i, message in enumerate(queue):
            if message is event:
                del queue[i]
                self._queued_bytes -= len(event)
                count = self._unsent_events[event]
                if count == 1:
                    del self._unsent_events[event]
                else:
                    self._unsent_events[event] = count - 1
                return

    async def _expirer(self) -> None:
        """Discard guest events left unread past the watch-event timeout (XSA-326)."""
        deadlines = self._deadlines
        while True:
            if not deadlines:
                self._have_deadline = trio.Event()
                await self._have_deadline.wait()
                continue
            await trio.sleep_until(deadlines[0][0])
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                self._expire(deadlines.popleft()[1])
            if self._queue:
                self._have_room.set()

    async def _reader(self) -> None:
        decoder = self._decoder
        sock = self._sock
        fd = sock.fileno()
        queue = self._queue
        dispatch = self._dispatch
        conn_id = self.conn_id
        adopted = decoder.buffered > 0  # input a live update carried over comes first
        eager = 0  # reads left that may skip the wait (see _EAGER_READS)
        while True:
            if adopted:
                adopted = False
            else:
                data = b""
                if eager:
                    eager -= 1
                    try:
                        data = sock.recv(_RECEIVE_SIZE)
                    except BlockingIOError:
                        eager = 0
                    except OSError:
                        return
                    else:
                        if not data:
                            return
                if not data:
                    await trio.lowlevel.wait_readable(fd)
                    eager = _EAGER_READS
                    try:
                        data = sock.recv(_RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
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
                if queue and len(queue) >= self._limit():
                    if self._send_queued() < 0:
                        return
                    self._held = packet
                    while len(queue) >= self._limit():
                        self._have_data.set()
                        self._have_room = trio.Event()
                        await self._have_room.wait()
                    self._held = None
                self._in_batch = True
                try:
                    dispatch(conn_id, packet)
                finally:
                    self._in_batch = False
                if self.closed:
                    return
            if queue and self._send_queued() < 0:
                return
            if queue:
                self._have_data.set()  # the kernel is full: the writer waits for room

    async def _writer(self) -> None:
        sock = self._sock
        queue = self._queue
        while True:
            if not queue:
                self._have_data = trio.Event()
                await self._have_data.wait()
                continue
            sent = self._send_queued()
            if sent < 0:
                return
            if sent:
                self._have_room.set()
            if queue:
                await trio.lowlevel.wait_writable(sock)

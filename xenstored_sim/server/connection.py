"""One client connection: a reader task and a writer task around a bounded output queue.

Theory of operation.  The reader decodes requests and hands each to the daemon, which runs
the engine and pushes every resulting message to the queue of the connection it is for.  The
writer drains its own queue.  Nothing a connection does can block another:

* A client that sends but never reads fills only its own queue.  Before each request the
  reader waits while the queue holds ``limit`` unsent messages: the ``outstanding`` quota
  for guests (C stops reading a guest's ring the same way, xenstore-facts.md §7.3), a larger
  bound for privileged sockets.
* Watch events caused by *other* connections cannot wait.  If a queue ever holds more than
  :data:`BACKLOG_MAX` messages, or more bytes than :data:`BACKLOG_SLOTS_MIN` (or ``limit``,
  if larger) messages of the largest size, the client is not reading at all, and the
  connection is closed rather than letting memory grow.  The byte bound matters for guests:
  a guest's own writes can queue large events on its other, unread connections (XSA-326).
* A header announcing more than 4096 bytes is a protocol violation: the connection is
  dropped without a reply (§1.10).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from ..wire import HEADER_SIZE, NEED_DATA, PAYLOAD_MAX, Packet, PacketDecoder, RemoteProtocolError

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


class ClientConnection:
    """The I/O side of one engine connection."""

    def __init__(
        self,
        conn_id: int,
        stream: trio.abc.Stream,
        dispatch: Callable[[int, Packet], None],
        limit: Callable[[], int],
    ) -> None:
        self.conn_id = conn_id
        self._stream = stream
        self._dispatch = dispatch
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._have_data = trio.Event()
        self._have_room = trio.Event()
        self._cancel = trio.CancelScope()
        self.closed = False

    def push(self, data: bytes) -> None:
        """Queue an encoded message; never blocks."""
        if self.closed:
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        slots = max(self._limit(), BACKLOG_SLOTS_MIN)
        if len(self._queue) > BACKLOG_MAX or self._queued_bytes > slots * _RECEIVE_SIZE:
            self.close()
            return
        self._have_data.set()

    def close(self) -> None:
        """Stop both tasks; the connection's stream is closed on the way out."""
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._cancel.cancel()

    async def run(self) -> None:
        """Serve until the client hangs up, breaks the protocol or is closed."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader()
                # Let the writer flush what is queued, then stop it.
                while self._queue and not self.closed:
                    self._have_room = trio.Event()
                    await self._have_room.wait()
                nursery.cancel_scope.cancel()
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(self._stream)

    async def _reader(self) -> None:
        decoder = PacketDecoder()
        stream = self._stream
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            decoder.receive_data(data if isinstance(data, bytes) else bytes(data))
            while True:
                try:
                    packet = decoder.next_packet()
                except RemoteProtocolError:
                    self.close()  # no reply: C closes the socket at once (§1.10)
                    return
                if packet is NEED_DATA:
                    break
                assert isinstance(packet, Packet)
                limit = self._limit()
                while len(self._queue) >= limit:
                    self._have_room = trio.Event()
                    await self._have_room.wait()
                self._dispatch(self.conn_id, packet)
                if self.closed:
                    return

    async def _writer(self) -> None:
        stream = self._stream
        queue = self._queue
        while True:
            if not queue:
                self._have_data = trio.Event()
                await self._have_data.wait()
                continue
            batch = b"".join(queue)
            queue.clear()
            self._queued_bytes = 0
            try:
                await stream.send_all(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.close()
                return
            self._have_room.set()

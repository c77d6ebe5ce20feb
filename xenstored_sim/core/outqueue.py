"""The output queue of one connection: what C xenstored keeps in ``conn->out_list``.

Sans-IO: the queue holds encoded messages and applies the policy on them; the connection's
trio shell (server/connection.py) sends its bytes and says how many the kernel took.

Theory of operation.  The queue keeps one entry per message not wholly sent, in order; the
head may be partly sent (only its unsent tail is kept).  Its rules:

* Bounds.  A queue holding more than :data:`BACKLOG_MAX` messages, or more bytes than
  :data:`BACKLOG_SLOTS_MIN` (or ``limit()``, if larger) messages of the largest size, belongs to
  a client that is not reading: :meth:`OutQueue.push` reports it and the shell closes the
  connection rather than letting memory grow (XSA-326; C bounds the same memory per domain,
  tools/xenstored/domain.c: domain_memory_add()).  ``limit()`` is the connection's
  ``outstanding`` quota; the shell stops reading requests while :meth:`OutQueue.full`.
* Duplicate watch events.  A watch event identical to one still queued and wholly unsent is
  dropped, unless its path is special (``@...``) (tools/xenstored/core.c: send_event()).
* Expiry.  With an event timeout (guest connections), a watch event still wholly unsent
  that long after it was queued is discarded (tools/xenstored/core.c: check_event_timeout()).

Events are told apart by identity: pass a fresh ``bytes`` object for each (as
``wire.encode`` makes), so that a timeout discards only the event it was set for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from ..wire import HEADER_SIZE, PAYLOAD_MAX

#: Unsent messages a privileged connection may accumulate before its reader pauses.
PRIVILEGED_OUTSTANDING: Final = 1024
#: Unsent messages after which a connection is considered dead and closed.
BACKLOG_MAX: Final = 16384
#: The byte backlog of a connection is bounded to at least this many maximum-size messages.
BACKLOG_SLOTS_MIN: Final = 64
#: The largest message: a header and a maximum payload.
MESSAGE_MAX: Final = HEADER_SIZE + PAYLOAD_MAX
# Below this many queued bytes no connection is over its byte bound.
_BYTES_MIN: Final = MESSAGE_MAX * BACKLOG_SLOTS_MIN


class OutQueue:
    """Messages of one connection waiting to be sent, with C's queue policy.

    ``limit`` returns the connection's outstanding-message quota (read at each check, since a
    SET_QUOTA may change it); ``event_timeout`` is the seconds a watch event may wait unsent,
    or None for no expiry.
    """

    __slots__ = ("_deadlines", "_events", "_limit", "_queue", "_queued_bytes", "event_timeout")

    def __init__(self, limit: Callable[[], int], event_timeout: float | None = None) -> None:
        self._limit = limit
        self.event_timeout = event_timeout
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        # Queued, wholly unsent watch events -> how many (for the duplicate rule).
        self._events: dict[bytes, int] = {}
        # (deadline, event) in the order queued: deadlines only grow.
        self._deadlines: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        """Messages queued and not wholly sent."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def full(self) -> bool:
        """True while the connection may not take another request (its quota is reached)."""
        queue = self._queue
        return bool(queue) and len(queue) >= self._limit()

    def push(self, data: bytes) -> bool:
        """Queue an encoded message.  False if the queue is now over its bounds: the
        connection must then be closed."""
        queue = self._queue
        queue.append(data)
        queued = self._queued_bytes = self._queued_bytes + len(data)
        return not (
            len(queue) > BACKLOG_MAX
            or (
                queued > _BYTES_MIN and queued > MESSAGE_MAX * max(self._limit(), BACKLOG_SLOTS_MIN)
            )
        )

    def push_event(self, data: bytes, now: float = 0.0) -> bool:
        """Queue an encoded watch event queued at time ``now`` (used only with an event
        timeout), unless an identical non-special one is queued and wholly unsent.  False if
        the queue is now over its bounds, as for :meth:`push`."""
        events = self._events
        count = events.get(data)
        if count:
            if data[HEADER_SIZE : HEADER_SIZE + 1] != b"@":
                return True
            events[data] = count + 1
        else:
            events[data] = 1
        timeout = self.event_timeout
        if timeout is not None:
            self._deadlines.append((now + timeout, data))
        return self.push(data)

    def adopt(self, unsent: bytes) -> None:
        """Queue bytes a live update carried over (not a watch event for the rules above)."""
        if unsent:
            self._queue.append(unsent)
            self._queued_bytes += len(unsent)

    def pending(self) -> bytes:
        """All queued bytes, in order: what to send next."""
        queue = self._queue
        return queue[0] if len(queue) == 1 else b"".join(queue)

    def sent(self, count: int) -> None:
        """The first ``count`` bytes of :meth:`pending` went out."""
        queue = self._queue
        if count == self._queued_bytes:
            queue.clear()
            self._queued_bytes = 0
            if self._events:
                self._events.clear()
            return
        # One entry per unsent message stays: ``limit`` counts messages.
        self._queued_bytes -= count
        events = self._events
        while count:
            head = queue[0]
            if events:
                self._forget_event(head)
            if len(head) <= count:
                queue.popleft()
                count -= len(head)
            else:
                queue[0] = head[count:]  # partly sent: no longer a candidate to drop
                count = 0

    def next_deadline(self) -> float | None:
        """When the oldest event that may expire does, or None."""
        deadlines = self._deadlines
        return deadlines[0][0] if deadlines else None

    def expire(self, now: float) -> int:
        """Discard the events whose deadline is ``now`` or earlier and that are still
        wholly unsent.  Returns how many were discarded."""
        deadlines = self._deadlines
        dropped = 0
        while deadlines and deadlines[0][0] <= now:
            event = deadlines.popleft()[1]
            queue = self._queue
            for i, message in enumerate(queue):
                if message is event:
                    del queue[i]
                    self._queued_bytes -= len(event)
                    self._forget_event(event)
                    dropped += 1
                    break
        return dropped

    def clear(self) -> None:
        """Drop everything (the connection is closed)."""
        self._queue.clear()
        self._queued_bytes = 0
        self._events.clear()
        self._deadlines.clear()

    def _forget_event(self, message: bytes) -> None:
        """``message`` leaves the wholly-unsent set, if it is an event there."""
        events = self._events
        count = events.get(message)
        if count == 1:
            del events[message]
        elif count:
            events[message] = count - 1

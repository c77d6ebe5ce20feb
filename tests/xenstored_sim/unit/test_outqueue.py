"""The sans-IO output queue (core/outqueue.py): its rules one by one, and a state machine
comparing it with a plain list model of C's ``conn->out_list``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenstored_sim.core.outqueue import BACKLOG_MAX, BACKLOG_SLOTS_MIN, MESSAGE_MAX, OutQueue
from xenstored_sim.wire import PAYLOAD_MAX, Op, Packet, encode


def event(path: str, token: str = "t") -> bytes:
    return encode(Packet(Op.WATCH_EVENT, 0, 0, f"{path}\0{token}\0".encode()))


def reply(req_id: int, size: int = 3) -> bytes:
    return encode(Packet(Op.READ, req_id, 0, b"x" * size))


def test_push_keeps_order_and_sent_consumes_it() -> None:
    q = OutQueue(lambda: 20)
    a, b = reply(1), reply(2, 10)
    assert q.push(a) and q.push(b)
    assert len(q) == 2 and q.pending() == a + b and q.queued_bytes == len(a + b)
    q.sent(5)
    assert len(q) == 2 and q.pending() == (a + b)[5:]
    q.sent(len(a) - 5)
    assert len(q) == 1 and q.pending() == b
    q.sent(len(b))
    assert len(q) == 0 and q.pending() == b"" and q.queued_bytes == 0


def test_full_at_the_outstanding_limit() -> None:
    limit = 3
    q = OutQueue(lambda: limit)
    assert not q.full()
    for i in range(3):
        q.push(reply(i))
    assert q.full()
    limit = 4  # a SET_QUOTA takes effect at the next check
    assert not q.full()


def test_message_count_bound() -> None:
    q = OutQueue(lambda: 20)
    assert all(q.push(reply(i, 0)) for i in range(BACKLOG_MAX))
    assert not q.push(reply(0, 0))


def test_byte_bound_follows_the_larger_of_limit_and_slots() -> None:
    big = encode(Packet(Op.READ, 1, 0, b"y" * PAYLOAD_MAX))
    assert len(big) == MESSAGE_MAX
    for limit, slots in ((1, BACKLOG_SLOTS_MIN), (100, 100)):
        q = OutQueue(lambda limit=limit: limit)  # type: ignore[misc]
        assert all(q.push(big) for _ in range(slots))
        assert not q.push(reply(2, 0)), limit


def test_duplicate_event_dropped_while_wholly_unsent() -> None:
    q = OutQueue(lambda: 20)
    assert q.push_event(event("/a"))
    assert q.push_event(event("/a"))
    assert len(q) == 1
    q.sent(1)  # partly sent: no longer a duplicate candidate
    assert q.push_event(event("/a"))
    assert len(q) == 2
    assert q.push_event(event("/a", "other"))
    assert len(q) == 3


def test_special_events_are_never_dropped_as_duplicates() -> None:
    q = OutQueue(lambda: 20)
    for _ in range(3):
        q.push_event(event("@releaseDomain"))
    assert len(q) == 3


def test_events_expire_only_while_wholly_unsent() -> None:
    q = OutQueue(lambda: 20, event_timeout=20.0)
    first, second = event("/a"), event("/b")
    q.push_event(first, now=0.0)
    q.push(reply(1))
    q.push_event(second, now=5.0)
    assert q.next_deadline() == 20.0
    assert q.expire(19.9) == 0
    q.sent(2)  # the first event is partly sent and stays
    assert q.expire(20.0) == 0
    assert q.next_deadline() == 25.0
    assert q.expire(30.0) == 1
    assert q.next_deadline() is None
    assert q.pending() == first[2:] + reply(1)


def test_a_timeout_discards_only_its_own_event() -> None:
    q = OutQueue(lambda: 20, event_timeout=1.0)
    first = event("@introduceDomain")
    q.push_event(first, now=0.0)
    q.sent(3)
    later = event("@introduceDomain")  # equal bytes, queued later: its own deadline
    q.push_event(later, now=0.5)
    assert q.expire(1.0) == 0
    assert q.pending() == first[3:] + later
    assert q.expire(1.5) == 1
    assert q.pending() == first[3:]


def test_without_timeout_events_never_expire() -> None:
    q = OutQueue(lambda: 20)
    q.push_event(event("/a"), now=0.0)
    assert q.next_deadline() is None and q.expire(1e9) == 0 and len(q) == 1


def test_adopted_bytes_are_one_message_and_no_event() -> None:
    q = OutQueue(lambda: 20)
    blob = event("/a") + reply(1)
    q.adopt(blob)
    q.adopt(b"")
    assert len(q) == 1 and q.pending() == blob
    assert q.push_event(event("/a"))
    assert len(q) == 2


def test_clear_forgets_everything() -> None:
    q = OutQueue(lambda: 20, event_timeout=1.0)
    q.push_event(event("/a"), now=0.0)
    q.clear()
    assert len(q) == 0 and q.queued_bytes == 0 and q.next_deadline() is None
    assert q.push_event(event("/a"), now=0.0) and len(q) == 1


# ---------------------------------------------------------------- the model


@dataclass
class Entry:
    """One queued message of the model: its unsent bytes and what it is."""

    data: bytes
    event: bool
    whole: bool  # wholly unsent
    token: int


class OutQueueModel(RuleBasedStateMachine):
    """OutQueue against a list of entries where every rule is a linear scan."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 20
        self.now = 0.0
        self.tokens = itertools.count()

    @initialize(timeout=st.none() | st.sampled_from([1.0, 20.0]))
    def start(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.q = OutQueue(lambda: self.limit, timeout)
        self.entries: list[Entry] = []
        self.deadlines: list[tuple[float, int]] = []

    def _over(self) -> bool:
        size = sum(len(e.data) for e in self.entries)
        return len(self.entries) > BACKLOG_MAX or size > MESSAGE_MAX * max(
            self.limit, BACKLOG_SLOTS_MIN
        )

    def _closed_if(self, accepted: bool) -> None:
        assert accepted == (not self._over())
        if not accepted:  # the shell closes the connection
            self.q.clear()
            self.entries.clear()
            self.deadlines.clear()

    @rule(size=st.integers(0, PAYLOAD_MAX))
    def push_reply(self, size: int) -> None:
        self.entries.append(Entry(reply(1, size), False, True, next(self.tokens)))
        self._closed_if(self.q.push(self.entries[-1].data))

    @rule(copies=st.integers(1, 80))
    def flood(self, copies: int) -> None:
        for _ in range(copies):
            self.push_reply(PAYLOAD_MAX)

    @rule(
        path=st.sampled_from(["/a", "/b", "@introduceDomain", "@releaseDomain"]),
        token=st.sampled_from(["t", "u"]),
    )
    def push_event(self, path: str, token: str) -> None:
        data = event(path, token)
        duplicate = not path.startswith("@") and any(
            e.event and e.whole and e.data == data for e in self.entries
        )
        accepted = self.q.push_event(data, self.now)
        if duplicate:
            assert accepted
            return
        entry = Entry(data, True, True, next(self.tokens))
        self.entries.append(entry)
        if self.timeout is not None:
            self.deadlines.append((self.now + self.timeout, entry.token))
        self._closed_if(accepted)

    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        total = sum(len(e.data) for e in self.entries)
        count = data.draw(st.integers(0, total))
        self.q.sent(count)
        while count:
            head = self.entries[0]
            if len(head.data) <= count:
                count -= len(head.data)
                del self.entries[0]
            else:
                head.data, head.whole, count = head.data[count:], False, 0

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 5.0, 20.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        gone = 0
        while self.deadlines and self.deadlines[0][0] <= self.now:
            token = self.deadlines.pop(0)[1]
            for i, e in enumerate(self.entries):
                if e.token == token and e.whole:
                    del self.entries[i]
                    gone += 1
                    break
        assert self.q.expire(self.now) == gone

    @rule(limit=st.sampled_from([1, 2, 20, 128, 1024]))
    def set_quota(self, limit: int) -> None:
        self.limit = limit

    @precondition(lambda self: bool(self.entries))
    @rule(unsent=st.binary(min_size=1, max_size=40))
    def adopt(self, unsent: bytes) -> None:
        # Only a fresh connection adopts; the model checks that order is kept regardless.
        self.q.adopt(unsent)
        self.entries.append(Entry(unsent, False, True, next(self.tokens)))

    @invariant()
    def agrees(self) -> None:
        q = self.q
        assert len(q) == len(self.entries)
        assert q.pending() == b"".join(e.data for e in self.entries)
        assert q.queued_bytes == sum(len(e.data) for e in self.entries)
        assert q.full() == (bool(self.entries) and len(self.entries) >= self.limit)
        assert q.next_deadline() == (self.deadlines[0][0] if self.deadlines else None)


TestOutQueueModel = OutQueueModel.TestCase
TestOutQueueModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)

"""ReplyMatcher: req_id -> waiter bookkeeping, as plain function calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenstored_sim.client import ReplyMatcher, UnexpectedReply
from xenstored_sim.wire import Op, Packet, RemoteProtocolError


class Recorder:
    def __init__(self) -> None:
        self.packets: list[Packet] = []
        self.reasons: list[BaseException] = []

    def deliver(self, packet: Packet) -> None:
        self.packets.append(packet)

    def fail(self, reason: BaseException) -> None:
        self.reasons.append(reason)


def reply(req_id: int, payload: bytes = b"OK\0") -> Packet:
    return Packet(Op.WRITE, req_id, 0, payload)


def test_ids_count_from_one_and_skip_ids_in_use() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    assert [m.next_req_id() for _ in range(3)] == [1, 2, 3]
    m.expect(4, Recorder())
    assert m.next_req_id() == 5


def test_ids_wrap_at_2_to_the_32_and_never_use_zero() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    m._next_id = 2**32 - 1
    m.expect(1, Recorder())
    assert m.next_req_id() == 2**32 - 1
    assert m.next_req_id() == 2  # 0 is skipped, 1 is in use


def test_reply_goes_to_its_waiter_only() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    a, b = Recorder(), Recorder()
    m.expect(1, a)
    m.expect(2, b)
    assert m.dispatch(reply(2, b"two")) is b
    assert b.packets == [reply(2, b"two")] and a.packets == []
    assert len(m) == 1


def test_unknown_req_id_is_a_protocol_error() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    with pytest.raises(UnexpectedReply, match="unknown req_id 7"):
        m.dispatch(reply(7))
    assert issubclass(UnexpectedReply, RemoteProtocolError)


def test_second_reply_to_the_same_id_is_unexpected() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    m.expect(1, Recorder())
    m.dispatch(reply(1))
    with pytest.raises(UnexpectedReply):
        m.dispatch(reply(1))


def test_duplicate_expect_is_refused() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    m.expect(1, Recorder())
    with pytest.raises(ValueError, match="already in use"):
        m.expect(1, Recorder())


def test_abandoned_request_swallows_its_late_reply_once() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    w = Recorder()
    m.expect(1, w)
    m.abandon(1, reply_due=True)
    assert m.dispatch(reply(1)) is None
    assert w.packets == []
    with pytest.raises(UnexpectedReply):
        m.dispatch(reply(1))


def test_abandoned_id_is_not_reused_before_its_reply() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    m._next_id = 1
    m.expect(1, Recorder())
    m.abandon(1, reply_due=True)
    m._next_id = 1
    assert m.next_req_id() == 2


def test_unsent_request_leaves_no_trace() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    m.expect(1, Recorder())
    m.abandon(1, reply_due=False)
    with pytest.raises(UnexpectedReply):
        m.dispatch(reply(1))
    m._next_id = 1
    assert m.next_req_id() == 1


def test_drop_all_fails_every_waiter_and_later_ones_at_once() -> None:
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    waiters = [Recorder() for _ in range(3)]
    for i, w in enumerate(waiters, 1):
        m.expect(i, w)
    reason = EOFError("gone")
    assert m.drop_all(reason) == waiters
    assert all(w.reasons == [reason] for w in waiters)
    assert len(m) == 0 and m.closed_reason is reason
    late = Recorder()
    m.expect(9, late)
    assert late.reasons == [reason]
    m.drop_all(ValueError("second"))
    assert m.closed_reason is reason


@given(st.lists(st.tuples(st.sampled_from(["send", "reply", "abandon"]), st.integers(0, 7))))
def test_every_waiter_gets_exactly_one_outcome(script: list[tuple[str, int]]) -> None:
    """Model: whatever the interleaving, a waiter is resolved at most once, and drop_all
    resolves every one still pending."""
    m: ReplyMatcher[Recorder] = ReplyMatcher()
    pending: dict[int, Recorder] = {}
    abandoned: set[int] = set()
    every: list[Recorder] = []
    for action, n in script:
        if action == "send":
            w = Recorder()
            req_id = m.next_req_id()
            assert req_id not in pending and req_id not in abandoned
            m.expect(req_id, w)
            pending[req_id] = w
            every.append(w)
        elif action == "reply" and pending:
            req_id = sorted(pending)[n % len(pending)]
            assert m.dispatch(reply(req_id)) is pending.pop(req_id)
        elif action == "reply" and abandoned:
            req_id = sorted(abandoned)[n % len(abandoned)]
            abandoned.discard(req_id)
            assert m.dispatch(reply(req_id)) is None
        elif action == "abandon" and pending:
            req_id = sorted(pending)[n % len(pending)]
            pending.pop(req_id)
            m.abandon(req_id, reply_due=True)
            abandoned.add(req_id)
    assert len(m) == len(pending)
    m.drop_all(EOFError())
    for w in every:
        assert len(w.packets) + len(w.reasons) <= 1
    assert all(len(w.reasons) == 1 for w in pending.values())

"""The hypercall codec: framing, envelopes and argument checks."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor_sim.protocol import (
    NEED_DATA,
    FrameDecoder,
    HypercallError,
    Ioreq,
    MalformedMessage,
    ProtocolError,
    Request,
    check_args,
    ioreq_event,
    pack,
    parse_request,
    pci_config_addr,
    unpack,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=8), values, max_size=5)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while isinstance(p := decoder.next_payload(), bytes):
        out.append(p)
    return out


@given(st.lists(messages, max_size=6), st.data())
def test_frames_survive_any_chunking(batch: list[dict[str, object]], data: st.DataObject) -> None:
    stream = b"".join(pack(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    got: list[dict[str, object]] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.receive_data(stream[a:b])
        got += [unpack(p) for p in _drain(decoder)]
    assert got == batch
    assert decoder.buffered == 0


def test_partial_header_and_body_need_data() -> None:
    frame = pack({"id": 1, "call": "version", "args": {}})
    decoder = FrameDecoder()
    decoder.receive_data(frame[:3])
    assert decoder.next_payload() is NEED_DATA
    decoder.receive_data(frame[3:-1])
    assert decoder.next_payload() is NEED_DATA
    decoder.receive_data(frame[-1:])
    assert parse_request(unpack(_drain(decoder)[0])) == Request(1, "version", {})


def test_oversized_frame_is_a_protocol_error() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.receive_data(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="101 bytes"):
        decoder.next_payload()
    with pytest.raises(ValueError, match="frame limit"):
        pack({"blob": bytes(16 * 1024 * 1024 + 1)})


@pytest.mark.parametrize(
    ("payload", "rid", "match"),
    [
        (b"\xc1", None, "not msgpack"),
        (msgpack.packb([1]), None, "not a map"),
        (msgpack.packb({1: 2}), None, "string"),
        (msgpack.packb({"id": "1", "call": "version"}), None, "id"),
        (msgpack.packb({"id": True, "call": "version"}), None, "id"),
        (msgpack.packb({"id": 3}), 3, "call"),
        (msgpack.packb({"id": 4, "call": "version", "args": [1]}), 4, "args"),
    ],
)
def test_malformed_requests(payload: bytes, rid: int | None, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match) as exc:
        parse_request(unpack(payload))
    assert exc.value.id == rid


@pytest.mark.parametrize(
    ("call", "args", "errno_name", "match"),
    [
        ("frobnicate", {}, "ENOSYS", "unknown call"),
        ("domain_create", {"max_pages": 1}, "EINVAL", "'name'"),
        ("domain_create", {"name": "x", "max_pages": True}, "EINVAL", "integer"),
        ("domain_create", {"name": "x", "max_pages": 1, "hvm": 1}, "EINVAL", "boolean"),
        ("populate_physmap", {"domid": 1, "gfns": [1, "2"]}, "EINVAL", "list of integers"),
        ("guest", {"domid": 1, "ops": {}}, "EINVAL", "a list"),
        ("p2m", {"domid": 1, "extra": 0}, "EINVAL", "extra"),
    ],
)
def test_argument_checks(call: str, args: dict[str, object], errno_name: str, match: str) -> None:
    with pytest.raises(HypercallError, match=match) as exc:
        check_args(call, args)
    assert exc.value.errno_name == errno_name


def test_good_arguments_pass() -> None:
    check_args("domain_create", {"name": "x", "max_pages": 1})
    check_args("ioreq_complete", {"seq": 1})
    check_args("guest_driver", {"domid": 1, "device": "stdvga", "action": "map_bar"})


def test_ioreq_event_round_trip() -> None:
    addr = pci_config_addr(0x10, 0x04)
    event = ioreq_event(5, 1, "pci_config", "write", addr, 2, 0x3)
    ioreq = Ioreq.from_event(unpack(_one(pack(event))))
    assert (ioreq.sbdf, ioreq.reg, ioreq.size, ioreq.data, ioreq.dir) == (0x10, 4, 2, 3, "write")


def _one(frame: bytes) -> bytes:
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    [payload] = _drain(decoder)
    return payload

"""Property fuzzing of every pure parser that reads untrusted input: save images, the device
model's device-state files, QMP lines and hypercall frames.  Each is fed mutated valid inputs
and arbitrary bytes; only its documented error type may escape, never another exception."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor_sim import protocol
from qemu_model import vmstate
from qemu_model.errors import LoadError
from qemu_model.machine import Machine
from qemu_model.qmp import QmpSession
from qemu_model.testing import FakeHypervisor, FakeXenStore
from qemu_model.xenforeignmemory import ForeignMemory
from toolstack import emulator_xenstore, savefile
from toolstack.config import ConfigError, DomainConfig, parse_config
from toolstack.emulator_xenstore import XenstoreDataError
from toolstack.image import copy_emulator_context, read_image, write_image
from toolstack.memory_stream import PAGE_SIZE, read_memory_stream
from toolstack.streamio import ImageReader, StreamError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Mutations of valid inputs


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bit flips, byte overwrites, insertions, deletions or a truncation;
    the positions favour the headers at the front, where the parsers make their decisions."""
    buf = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        front = draw(st.booleans())
        pos = draw(st.integers(0, min(len(buf), 160) - 1 if front else len(buf) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "u32"]))
        if kind == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del buf[pos:]
        else:
            word = draw(st.sampled_from([0, 1, 7, 0xFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            buf[pos : pos + 4] = word.to_bytes(4, draw(st.sampled_from(["little", "big"])))
    return bytes(buf)


# --------------------------------------------------------------------------------------------
# Save images (toolstack.image, stream, memory_stream, savefile, emulator_xenstore, config)

CONFIG = DomainConfig(name="vm", memory_mib=1, vga="stdvga", dm_mode="compat")
PHYSMAP = [
    ("physmap/1f00000/start_addr", "f0000000"),
    ("physmap/1f00000/size", "800000"),
    ("physmap/1f00000/name", "vga.vram"),
]


def _image(pairs: list[tuple[str, str]]) -> bytes:
    pfns = [0, 1, 2, 0x100, 0xF0000]
    pages = [bytes([p & 0xFF]) * PAGE_SIZE for p in pfns]
    f = io.BytesIO()
    write_image(
        f, CONFIG, [(pfns[:3], pages[:3]), (pfns[3:], pages[3:])], pairs, io.BytesIO(b"ctx")
    )
    return f.getvalue()


IMAGE = _image(PHYSMAP)
IMAGE_NO_KEYS = _image([])


def _read_whole(data: bytes) -> None:
    """What a restore does with an image before anything is created from it."""
    f = io.BytesIO(data)
    index = read_image(f)
    assert index.memory is not None and index.emulator_context is not None
    copy_emulator_context(f, index, io.BytesIO())


def test_the_valid_images_parse() -> None:
    _read_whole(IMAGE)
    _read_whole(IMAGE_NO_KEYS)


@FUZZ
@given(st.data())
def test_mutated_images_raise_only_stream_errors(data: st.DataObject) -> None:
    blob = data.draw(mutated(data.draw(st.sampled_from([IMAGE, IMAGE_NO_KEYS]))))
    try:
        _read_whole(blob)
    except StreamError as exc:
        assert str(exc)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_not_an_image(blob: bytes) -> None:
    with pytest.raises(StreamError):
        _read_whole(blob)


def _libxc_part() -> bytes:
    start = IMAGE.index(b"\xff" * 8 + b"XENF")
    return IMAGE[start:]


@FUZZ
@given(st.data())
def test_mutated_memory_streams_raise_only_stream_errors(data: st.DataObject) -> None:
    blob = data.draw(mutated(_libxc_part()))
    with contextlib.suppress(StreamError):
        read_memory_stream(ImageReader(io.BytesIO(blob)))


@FUZZ
@given(st.data())
def test_mutated_savefile_headers_raise_only_stream_errors(data: st.DataObject) -> None:
    f = io.BytesIO()
    savefile.write_header(f, CONFIG)
    blob = data.draw(mutated(f.getvalue()))
    with contextlib.suppress(StreamError):
        savefile.read_header(ImageReader(io.BytesIO(blob)))


@FUZZ
@given(st.data())
def test_mutated_xenstore_data_raises_only_its_error(data: st.DataObject) -> None:
    blob = data.draw(mutated(emulator_xenstore.encode(PHYSMAP)))
    try:
        decoded = emulator_xenstore.decode(blob)
    except XenstoreDataError:
        return
    for key, _ in decoded.pairs:
        emulator_xenstore.check_restore_key(key)  # whatever decode accepts, libxl would write


@FUZZ
@given(st.data())
def test_mutated_configs_raise_only_config_errors(data: st.DataObject) -> None:
    text = 'name = "vm"\nmemory = 16\nvga = "qxl"; videoram = 64\ndm_mode = "compat" # c\n'
    blob = data.draw(mutated(text.encode()))
    with contextlib.suppress(ConfigError):
        parse_config(blob.decode("utf-8", "replace"))
    with contextlib.suppress(ConfigError):
        DomainConfig.from_json(data.draw(mutated(CONFIG.to_json().encode())))


# --------------------------------------------------------------------------------------------
# Device-state files (qemu_model.vmstate and the machine's checks)


@pytest.fixture(scope="module")
def machines() -> Iterator[dict[str, tuple[Machine, bytes]]]:
    hv, xs = FakeHypervisor(), FakeXenStore()
    made: dict[str, tuple[Machine, bytes]] = {}
    try:
        for domid, device in enumerate(("stdvga", "cirrus", "qxl"), 1):
            m = Machine(
                domid=domid,
                mode="new",
                device=device,
                ram_size=4 << 20,
                vram_size=4 << 20,
                fmem=ForeignMemory(hv),
                hypercalls=hv,
                xenstore=xs,
                incoming=False,
            )
            m.runstate = "paused"
            made[device] = (m, m.save_devices_state())
        yield made
    finally:
        for m, _ in made.values():
            m.close()
        hv.close()


_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),  # what msgpack can carry
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=300),
)


@st.composite
def replaced_leaf(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one value somewhere inside it replaced, removed or retyped."""
    if isinstance(doc, dict) and doc and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(doc, key=repr)))
        out = dict(doc)
        if draw(st.integers(0, 5)) == 0:
            del out[key]
        else:
            out[key] = draw(replaced_leaf(doc[key]))
        return out
    if isinstance(doc, list) and doc and draw(st.integers(0, 3)):
        i = draw(st.integers(0, len(doc) - 1))
        return [*doc[:i], draw(replaced_leaf(doc[i])), *doc[i + 1 :]]
    return draw(
        st.one_of(
            _LEAVES,
            st.lists(_LEAVES, max_size=3),
            st.dictionaries(st.text(max_size=4), _LEAVES, max_size=3),
        )
    )


@FUZZ
@given(st.data())
def test_mutated_device_state_raises_only_load_errors(
    machines: dict[str, tuple[Machine, bytes]], data: st.DataObject
) -> None:
    device = data.draw(st.sampled_from(sorted(machines)))
    machine, valid = machines[device]
    if data.draw(st.booleans()):
        blob = data.draw(mutated(valid))
    else:
        doc = msgpack.unpackb(valid, raw=False, strict_map_key=False)
        blob = msgpack.packb(data.draw(replaced_leaf(doc)), use_bin_type=True)
    try:
        vmstate.decode(blob)
        machine.check_devices_state(blob)
    except LoadError as exc:
        assert str(exc)


def test_the_valid_device_states_pass(machines: dict[str, tuple[Machine, bytes]]) -> None:
    for machine, valid in machines.values():
        machine.check_devices_state(valid)


# --------------------------------------------------------------------------------------------
# QMP lines (qemu_model.qmp)

_QMP_VALID = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "query-status", "id": 7}',
    b'{"execute": "xen-save-devices-state", "arguments": {"filename": "/tmp/x", "live": false}}',
    b'{"execute": "x-physmap-info"}',
]


@FUZZ
@given(st.data())
def test_mutated_qmp_lines_get_replies_not_exceptions(data: st.DataObject) -> None:
    session = QmpSession()
    for _ in range(data.draw(st.integers(1, 4))):
        line = data.draw(
            st.one_of(mutated(data.draw(st.sampled_from(_QMP_VALID))), st.binary(max_size=64))
        )
        got = session.receive_line(line)
        assert got is None or isinstance(got, dict) or hasattr(got, "name")
        if isinstance(got, dict):
            assert "error" in got or "return" in got


# --------------------------------------------------------------------------------------------
# Hypercall frames (hypervisor_sim.protocol)

_REQUEST = protocol.pack({"id": 3, "call": "map_foreign", "args": {"domid": 1, "gfns": [1, 2]}})


@FUZZ
@given(st.data())
def test_mutated_hypercall_frames_raise_only_protocol_errors(data: st.DataObject) -> None:
    dec = protocol.FrameDecoder(max_frame=1 << 16)
    stream = b"".join(
        data.draw(st.one_of(mutated(_REQUEST), st.just(_REQUEST), st.binary(max_size=40)))
        for _ in range(data.draw(st.integers(1, 4)))
    )
    try:
        dec.receive_data(stream)
        while isinstance(payload := dec.next_payload(), bytes):
            try:
                req = protocol.parse_request(protocol.unpack(payload))
                protocol.check_args(req.call, req.args)
            except (protocol.MalformedMessage, protocol.HypercallError):
                pass
    except protocol.ProtocolError:
        pass


@FUZZ
@given(st.data())
def test_retyped_requests_raise_only_documented_errors(data: st.DataObject) -> None:
    doc = msgpack.unpackb(_REQUEST[4:], raw=False)
    obj = data.draw(replaced_leaf(doc))
    try:
        req = protocol.parse_request(protocol.unpack(msgpack.packb(obj, use_bin_type=True)))
        protocol.check_args(req.call, req.args)
    except (protocol.MalformedMessage, protocol.HypercallError):
        pass


def test_deeply_nested_qmp_json_gets_an_error_reply() -> None:
    got = QmpSession().receive_line(b"[" * 100_000)
    assert isinstance(got, dict) and "error" in got

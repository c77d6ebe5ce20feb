"""The libxl stream layer: header, record headers, padding (libxl-migration-stream.pandoc)."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolstack import stream
from toolstack.stream import RecordType
from toolstack.streamio import ImageReader, StreamError


def reader(data: bytes) -> ImageReader:
    return ImageReader(io.BytesIO(data))


def test_header_is_big_endian_libxlfmt_version_2() -> None:
    f = io.BytesIO()
    stream.write_header(f)
    assert f.getvalue() == b"LibxlFmt" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x00"
    hdr = stream.read_header(reader(f.getvalue()))
    assert (hdr.version, hdr.legacy) == (2, False)


def test_legacy_option_bit_round_trips() -> None:
    f = io.BytesIO()
    stream.write_header(f, legacy=True)
    assert stream.read_header(reader(f.getvalue())).legacy


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"LibxlFmX" + struct.pack(">II", 2, 0), "bad libxl stream magic"),
        (b"LibxlFmt" + struct.pack(">II", 1, 0), "unsupported libxl stream version 1"),
        (b"LibxlFmt" + struct.pack(">II", 2, 4), "reserved libxl stream option bits"),
        (b"LibxlFmt" + struct.pack(">II", 2, 1), "big-endian"),
        (b"LibxlFmt\x00\x00", "truncated"),
    ],
)
def test_bad_headers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        stream.read_header(reader(data))


@given(st.binary(max_size=64))
def test_record_is_padded_to_8_and_reads_back(body: bytes) -> None:
    f = io.BytesIO()
    n = stream.write_record(f, RecordType.EMULATOR_CONTEXT, [body[:3], body[3:]])
    data = f.getvalue()
    assert n == len(data) and len(data) % 8 == 0
    assert len(data) == 8 + len(body) + stream.padding(len(body))
    r = reader(data)
    hdr = stream.read_record_header(r)
    assert (hdr.type, hdr.length, hdr.offset) == (RecordType.EMULATOR_CONTEXT, len(body), 8)
    assert stream.read_body(r, hdr) == body
    assert r.at_eof()


def test_unknown_record_type_is_rejected_even_in_the_optional_range() -> None:
    for rtype in (6, 0x80000000):
        with pytest.raises(StreamError, match="unrecognised record type"):
            stream.read_record_header(reader(struct.pack("<II", rtype, 0)))


def test_record_length_past_the_end_of_file_is_truncation() -> None:
    data = struct.pack("<II", RecordType.EMULATOR_CONTEXT, 100) + bytes(40)
    with pytest.raises(StreamError, match=r"truncated.*EMULATOR_CONTEXT record body of 100 bytes"):
        stream.read_record_header(reader(data))


def test_padding_counts_even_when_the_body_fits() -> None:
    # A 9-byte body needs 7 bytes of padding: 16 bytes after the header, not 9.
    data = struct.pack("<II", RecordType.EMULATOR_CONTEXT, 9) + bytes(12)
    with pytest.raises(StreamError, match="truncated"):
        stream.read_record_header(reader(data))


def test_overlong_record_is_rejected_before_reading() -> None:
    data = struct.pack("<II", RecordType.EMULATOR_CONTEXT, stream.RECORD_BODY_MAX + 1)
    with pytest.raises(StreamError, match="over the"):
        stream.read_record_header(reader(data))


def test_nonzero_padding_is_rejected() -> None:
    data = struct.pack("<II", RecordType.EMULATOR_CONTEXT, 1) + b"x" + b"\x00" * 6 + b"\x01"
    r = reader(data)
    with pytest.raises(StreamError, match="padding is not zero"):
        stream.read_body(r, stream.read_record_header(r))


def test_emulator_header_must_fit_and_name_a_known_emulator() -> None:
    with pytest.raises(StreamError, match="shorter than its emulator header"):
        stream.parse_emulator_header(b"\x02\x00\x00\x00", "EMULATOR_CONTEXT")
    with pytest.raises(StreamError, match="unknown emulator 0x7"):
        stream.parse_emulator_header(struct.pack("<II", 7, 0), "EMULATOR_CONTEXT")
    assert stream.parse_emulator_header(struct.pack("<II", 2, 1), "x") == (2, 1)

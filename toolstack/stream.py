"""The libxl migration stream, version 2, as pure functions over binary files.

Layout (Xen ``docs/specs/libxl-migration-stream.pandoc``, ``tools/libs/light/libxl_sr_stream_format.h``):

- a header of ``ident`` (u64, "LibxlFmt"), ``version`` (u32, 2) and ``options`` (u32: bit 0 is
  the stream's endianness, bit 1 marks a stream converted from the legacy format), always in
  big-endian order;
- records of ``type`` (u32) and ``body_length`` (u32) in the stream's own order (little-endian
  here, as on x86), then the body, zero-padded so that the record ends on an 8-octet boundary;
- ``LIBXC_CONTEXT`` has an empty body: the libxc stream follows it inline, because the sender
  cannot know its length in advance (spec footnote 1);
- ``EMULATOR_XENSTORE_DATA`` and ``EMULATOR_CONTEXT`` start with ``{emulator_id u32, index u32}``;
- ``END`` is the last record.

Nothing here does I/O beyond ``read``/``write``/``seek`` on the file object it is given, so a
256 MiB image streams through without being held in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO, Final

from .streamio import ImageReader, StreamError

IDENT: Final = 0x4C6962786C466D74  # "LibxlFmt"
VERSION: Final = 2
OPT_BIG_ENDIAN: Final = 1 << 0
OPT_LEGACY: Final = 1 << 1
_OPT_KNOWN: Final = OPT_BIG_ENDIAN | OPT_LEGACY

HEADER: Final = struct.Struct(">QII")
RECORD_HEADER: Final = struct.Struct("<II")
EMULATOR_HEADER: Final = struct.Struct("<II")
ALIGN: Final = 8

#: A piece of a record body: bytes, or a view of mapped guest memory.
Chunk = bytes | bytearray | memoryview

#: Bound on one record body that the reader accepts, the same as libxc's REC_LENGTH_MAX
#: (``xc_sr_stream_format.h``: "somewhat arbitrary - 128MB").
RECORD_BODY_MAX: Final = 128 << 20


class RecordType(IntEnum):
    END = 0x00000000
    LIBXC_CONTEXT = 0x00000001
    EMULATOR_XENSTORE_DATA = 0x00000002
    EMULATOR_CONTEXT = 0x00000003
    CHECKPOINT_END = 0x00000004
    CHECKPOINT_STATE = 0x00000005


class EmulatorId(IntEnum):
    UNKNOWN = 0x00000000
    QEMU_TRADITIONAL = 0x00000001
    QEMU_UPSTREAM = 0x00000002


def padding(length: int) -> int:
    """Zero octets after a body of ``length`` so the record ends 8-aligned."""
    return -length % ALIGN


def record_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"0x{rtype:08x}"


# --------------------------------------------------------------------------------------------
# Writing


def write_header(f: BinaryIO, *, legacy: bool = False) -> int:
    """The stream header for a little-endian image; returns the bytes written."""
    return f.write(HEADER.pack(IDENT, VERSION, OPT_LEGACY if legacy else 0))


def write_record(f: BinaryIO, rtype: int, body: Iterable[Chunk] = ()) -> int:
    """One record from the body pieces in ``body``; returns the bytes written.

    The pieces are written as given (memoryviews of mapped guest memory included), so the
    body is never joined in memory.
    """
    pieces = [memoryview(b).cast("B") for b in body]
    length = sum(len(p) for p in pieces)
    if length > 0xFFFFFFFF:
        raise ValueError(f"record body of {length} bytes does not fit body_length (u32)")
    n = f.write(RECORD_HEADER.pack(int(rtype), length))
    for p in pieces:
        n += f.write(p)
    pad = padding(length)
    if pad:
        n += f.write(bytes(pad))
    return n


def emulator_header(emulator_id: int = EmulatorId.QEMU_UPSTREAM, index: int = 0) -> bytes:
    return EMULATOR_HEADER.pack(int(emulator_id), index)


def write_emulator_context_header(f: BinaryIO, ctx_length: int, index: int = 0) -> int:
    """The record header and emulator sub-header of an ``EMULATOR_CONTEXT`` whose blob of
    ``ctx_length`` bytes the caller writes next, followed by :func:`write_padding`."""
    length = EMULATOR_HEADER.size + ctx_length
    if length > 0xFFFFFFFF:
        raise ValueError(f"emulator context of {ctx_length} bytes does not fit a record")
    return f.write(
        RECORD_HEADER.pack(RecordType.EMULATOR_CONTEXT, length)
        + emulator_header(EmulatorId.QEMU_UPSTREAM, index)
    )


def write_padding(f: BinaryIO, body_length: int) -> int:
    pad = padding(body_length)
    return f.write(bytes(pad)) if pad else 0


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class StreamHeader:
    version: int
    options: int

    @property
    def legacy(self) -> bool:
        return bool(self.options & OPT_LEGACY)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    type: int
    length: int
    #: File offset of the body.
    offset: int

    @property
    def name(self) -> str:
        return record_name(self.type)


def read_header(r: ImageReader) -> StreamHeader:
    start = r.offset
    ident, version, options = HEADER.unpack(r.read(HEADER.size, "libxl stream header"))
    if ident != IDENT:
        raise StreamError(
            f"bad libxl stream magic 0x{ident:016x} (expected 0x{IDENT:016x}, 'LibxlFmt')", start
        )
    if version != VERSION:
        raise StreamError(f"unsupported libxl stream version {version} (expected {VERSION})", start)
    if options & ~_OPT_KNOWN:
        raise StreamError(f"reserved libxl stream option bits set: 0x{options:08x}", start)
    if options & OPT_BIG_ENDIAN:
        raise StreamError("big-endian libxl streams are not supported on this host", start)
    return StreamHeader(version, options)


def read_record_header(r: ImageReader) -> RecordHeader:
    """The next record's header; checks that its padded body fits in the file."""
    start = r.offset
    rtype, length = RECORD_HEADER.unpack(r.read(RECORD_HEADER.size, "record header"))
    name = record_name(rtype)
    # libxl_stream_read.c fails on any type it does not know, optional range included.
    if rtype not in RecordType._value2member_map_:
        raise StreamError(f"unrecognised record type {name}", start)
    if length > RECORD_BODY_MAX:
        raise StreamError(
            f"{name} record claims {length} bytes, over the {RECORD_BODY_MAX}-byte limit", start
        )
    r.need(length + padding(length), f"{name} record body of {length} bytes")
    return RecordHeader(rtype, length, r.offset)


def read_body(r: ImageReader, hdr: RecordHeader) -> bytes:
    """A record's body; checks that its padding is zero."""
    body = r.read(hdr.length, f"{hdr.name} record body")
    skip_padding(r, hdr)
    return body


def skip_padding(r: ImageReader, hdr: RecordHeader) -> None:
    pad = padding(hdr.length)
    if pad:
        at = r.offset
        if any(r.read(pad, f"{hdr.name} record padding")):
            raise StreamError(f"{hdr.name} record padding is not zero", at)


def parse_emulator_header(body: bytes, what: str, offset: int | None = None) -> tuple[int, int]:
    """``(emulator_id, index)`` from the front of an emulator record body."""
    if len(body) < EMULATOR_HEADER.size:
        raise StreamError(
            f"{what} record of {len(body)} bytes is shorter than its emulator header "
            f"({EMULATOR_HEADER.size} bytes)",
            offset,
        )
    emulator_id, index = EMULATOR_HEADER.unpack_from(body)
    if emulator_id not in EmulatorId._value2member_map_:
        raise StreamError(f"{what} record names unknown emulator 0x{emulator_id:x}", offset)
    return emulator_id, index

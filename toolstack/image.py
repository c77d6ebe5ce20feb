"""A whole save image: xl's header, then the libxl stream with guest memory, the device model's
xenstore keys and its device state.

Record order for a plain HVM save (qemu-physmap.md §2.2; ``libxl_stream_write.c``):
``LIBXC_CONTEXT`` (memory follows inline) → ``EMULATOR_XENSTORE_DATA`` (only when there are
keys) → ``EMULATOR_CONTEXT`` → ``END``.

:func:`read_image` checks an entire image before anything is created from it and returns an
index of where everything is; :func:`load_pages` and :func:`copy_emulator_context` then read the
parts they need straight from the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from . import memory_stream, savefile, stream
from .config import DomainConfig
from .emulator_xenstore import XenstoreData, XenstoreDataError, decode, encode
from .memory_stream import PAGE_SIZE, MemoryImage, coalesce
from .stream import Chunk, EmulatorId, RecordType
from .streamio import ImageReader, StreamError

_COPY_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class WriteSummary:
    records: list[str]
    bytes: int


def write_image(
    f: BinaryIO,
    config: DomainConfig,
    page_batches: Iterable[tuple[Sequence[int], Sequence[Chunk]]],
    xenstore_pairs: Sequence[tuple[str, str]],
    emulator_context: BinaryIO,
    *,
    xen_version: tuple[int, int] = (4, 17),
) -> WriteSummary:
    """Write a complete image to ``f``.

    ``page_batches`` yields ``(pfns, contents)`` for each PAGE_DATA record;
    ``xenstore_pairs`` empty means no ``EMULATOR_XENSTORE_DATA`` record;
    ``emulator_context`` is the device-state file, copied from its current position to its end.
    """
    records: list[str] = []
    n = savefile.write_header(f, config)
    n += stream.write_header(f)

    n += stream.write_record(f, RecordType.LIBXC_CONTEXT)
    records.append(RecordType.LIBXC_CONTEXT.name)
    n += memory_stream.write_headers(f, *xen_version)
    for pfns, contents in page_batches:
        n += memory_stream.write_page_data(f, pfns, contents)
    n += memory_stream.write_end(f)

    if xenstore_pairs:
        n += stream.write_record(f, RecordType.EMULATOR_XENSTORE_DATA, [encode(xenstore_pairs)])
        records.append(RecordType.EMULATOR_XENSTORE_DATA.name)

    here = emulator_context.tell()
    ctx_len = emulator_context.seek(0, 2) - here
    emulator_context.seek(here)
    n += stream.write_emulator_context_header(f, ctx_len)
    copied = 0
    while chunk := emulator_context.read(_COPY_CHUNK):
        copied += len(chunk)
        n += f.write(chunk)
    if copied != ctx_len:
        raise OSError(f"device state changed size while being saved ({ctx_len} → {copied})")
    n += stream.write_padding(f, stream.EMULATOR_HEADER.size + ctx_len)
    records.append(RecordType.EMULATOR_CONTEXT.name)

    n += stream.write_record(f, RecordType.END)
    records.append(RecordType.END.name)
    return WriteSummary(records, n)


@dataclass(slots=True)
class ImageIndex:
    """Everything :func:`read_image` learned; offsets are into the image file."""

    config: DomainConfig | None
    records: list[str] = field(default_factory=list)
    memory: MemoryImage | None = None
    xenstore: XenstoreData | None = None
    #: ``(offset, length)`` of the device model's state blob (after the emulator sub-header).
    emulator_context: tuple[int, int] | None = None
    size: int = 0


def read_image(f: BinaryIO) -> ImageIndex:
    """Validate the whole image in ``f`` (seekable) and index it.

    Raises :class:`StreamError` naming the problem and its offset: a bad magic or version, a
    record length that overruns the file or breaks its record's rules, a missing ``END``,
    trailing bytes, or xenstore data that libxl would refuse (K5).
    """
    r = ImageReader(f)
    index = ImageIndex(savefile.read_header(r).config)
    stream.read_header(r)
    while True:
        if r.remaining() == 0:
            raise StreamError("image ends without an END record", r.offset)
        hdr = stream.read_record_header(r)
        index.records.append(hdr.name)
        where = hdr.offset - stream.RECORD_HEADER.size
        if hdr.type == RecordType.END:
            if hdr.length:
                raise StreamError("END record has a body", where)
            break
        if hdr.type == RecordType.LIBXC_CONTEXT:
            if hdr.length:
                raise StreamError(
                    "LIBXC_CONTEXT record has a body (the libxc stream follows it)", where
                )
            if index.memory is not None:
                raise StreamError("second LIBXC_CONTEXT record", where)
            index.memory = memory_stream.read_memory_stream(r)
        elif hdr.type == RecordType.EMULATOR_XENSTORE_DATA:
            if index.xenstore is not None:
                raise StreamError("second EMULATOR_XENSTORE_DATA record", where)
            body = stream.read_body(r, hdr)
            stream.parse_emulator_header(body, hdr.name, where)
            try:
                index.xenstore = decode(body)
            except XenstoreDataError as exc:
                raise StreamError(f"EMULATOR_XENSTORE_DATA: {exc}", where) from None
        elif hdr.type == RecordType.EMULATOR_CONTEXT:
            if index.emulator_context is not None:
                raise StreamError("second EMULATOR_CONTEXT record", where)
            head = r.read(min(hdr.length, stream.EMULATOR_HEADER.size), "emulator header")
            emulator_id, _ = stream.parse_emulator_header(head, hdr.name, where)
            if emulator_id != EmulatorId.QEMU_UPSTREAM:
                raise StreamError(
                    f"EMULATOR_CONTEXT is for {EmulatorId(emulator_id).name}, "
                    "but the device model is Qemu Upstream",
                    where,
                )
            ctx_len = hdr.length - stream.EMULATOR_HEADER.size
            index.emulator_context = (r.offset, ctx_len)
            r.skip(ctx_len, "emulator context")
            stream.skip_padding(r, hdr)
        else:
            raise StreamError(
                f"{hdr.name} records belong to Remus/COLO streams, not to a save file", where
            )
    if not r.at_eof():
        raise StreamError("trailing data after the END record", r.offset)
    if index.memory is None:
        raise StreamError("image has no LIBXC_CONTEXT record (guest memory)")
    if index.emulator_context is None:
        raise StreamError("image has no EMULATOR_CONTEXT record (device model state)")
    index.size = r.offset
    return index


def load_pages(
    f: BinaryIO, memory: MemoryImage, frame_offsets: Mapping[int, int], dst: memoryview
) -> int:
    """Read every page of ``memory`` from ``f`` into ``dst`` (the mapped memory file), where
    ``frame_offsets[pfn]`` is the offset of the pfn's frame in ``dst``.  Returns the pages read.

    Pages are read with one ``readinto`` per run of adjacent frames.
    """
    r = ImageReader(f)
    pages = 0
    for rec in memory.records:
        if not rec.data_pfns:
            continue
        r.seek(rec.data_offset)
        try:
            offsets = [frame_offsets[p] for p in rec.data_pfns]
        except KeyError as exc:
            raise StreamError(f"pfn 0x{exc.args[0]:x} has no frame to restore into") from None
        for ext in coalesce(offsets):
            r.readinto(dst[ext.offset : ext.offset + ext.length], "PAGE_DATA page contents")
        pages += len(rec.data_pfns)
    return pages


def copy_emulator_context(f: BinaryIO, index: ImageIndex, out: BinaryIO) -> int:
    """Copy the device-state blob to ``out``; returns its length."""
    if index.emulator_context is None:
        raise StreamError("image has no EMULATOR_CONTEXT record (device model state)")
    offset, length = index.emulator_context
    r = ImageReader(f)
    r.seek(offset)
    left = length
    while left:
        chunk = r.read(min(left, _COPY_CHUNK), "emulator context")
        out.write(chunk)
        left -= len(chunk)
    return length


__all__ = [
    "PAGE_SIZE",
    "ImageIndex",
    "WriteSummary",
    "copy_emulator_context",
    "load_pages",
    "read_image",
    "write_image",
]

"""A whole save image: xl's header, then the libxl stream with guest memory, the device model's
xenstore keys and its device state.

Record order for a plain HVM save (qemu-physmap.md §2.2; ``libxl_stream_write.c``):
``LIBXC_CONTEXT`` (memory follows inline) → ``EMULATOR_XENSTORE_DATA`` (only when there are
keys) → ``EMULATOR_CONTEXT`` → ``END``.

:func:`read_image` checks an entire image before anything is created from it and returns an
index of where everything is; :func:`load_pages` and :func:`copy_emulator_context` then read the
parts they need straight from the file.

:func:`save_image` and :func:`restore_pages` are the descriptor-level forms the toolstack uses:
page contents go between the guest's memory file (at the frame offsets ``map_foreign`` gives)
and the image with ``copy_file_range``, one call per run of adjacent frames, and a hole in the
source (a page never written, so all zeros) is left a hole rather than copied.  The image's
bytes are the same either way; only its blocks are sparse.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from . import memory_stream, savefile, stream
from .config import DomainConfig
from .emulator_xenstore import XenstoreData, XenstoreDataError, decode, encode
from .memory_stream import PAGE_SIZE, MemoryImage, coalesce, plan_batches
from .stream import Chunk, EmulatorId, RecordType
from .streamio import DataRuns, ImageReader, StreamError, copy_range

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


def save_image(
    out: int,
    config: DomainConfig,
    pfns: Sequence[int],
    frame_offsets: Sequence[int],
    mem: int,
    xenstore_pairs: Sequence[tuple[str, str]],
    emulator_context: int,
    *,
    xen_version: tuple[int, int] = (4, 17),
) -> WriteSummary:
    """Write a complete image to the empty file ``out`` (a descriptor), the same bytes as
    :func:`write_image`: the page of ``pfns[i]`` is read from ``mem`` at ``frame_offsets[i]``,
    the device state is all of ``emulator_context``.  Holes of ``mem`` stay holes in ``out``.
    """
    if len(pfns) != len(frame_offsets):
        raise ValueError("pfns and frame offsets differ in length")
    records: list[str] = []
    head = io.BytesIO()
    # Page contents are laid out on 4 KiB boundaries of the image, so that both this copy
    # and the restore's copy move whole page-cache pages: the config JSON is padded to
    # 8-align the records, then the first PAGE_DATA record's length aligns its contents.
    pad = -len(_head(io.BytesIO(), config, xen_version)) % 8
    pos = _pwrite_all(out, _head(head, config, xen_version, pad), 0)
    records.append(RecordType.LIBXC_CONTEXT.name)

    src = DataRuns(mem, max(frame_offsets, default=0) + PAGE_SIZE)
    first = memory_stream.aligned_first_batch(pos)
    for batch in plan_batches(pfns, frame_offsets, memory_stream.ALIGNED_BATCH_PAGES, first):
        pos += _pwrite_all(out, memory_stream.page_data_header(batch.pfns), pos)
        for ext in batch.extents:
            for off, length in src.pieces(ext.offset, ext.length):
                copy_range(mem, off, out, pos + off - ext.offset, length)
            pos += ext.length

    tail = io.BytesIO()
    memory_stream.write_end(tail)
    if xenstore_pairs:
        stream.write_record(tail, RecordType.EMULATOR_XENSTORE_DATA, [encode(xenstore_pairs)])
        records.append(RecordType.EMULATOR_XENSTORE_DATA.name)
    ctx_len = os.fstat(emulator_context).st_size
    stream.write_emulator_context_header(tail, ctx_len)
    pos += _pwrite_all(out, tail.getvalue(), pos)
    copy_range(emulator_context, 0, out, pos, ctx_len)
    pos += ctx_len
    tail = io.BytesIO()
    stream.write_padding(tail, stream.EMULATOR_HEADER.size + ctx_len)
    records.append(RecordType.EMULATOR_CONTEXT.name)
    stream.write_record(tail, RecordType.END)
    records.append(RecordType.END.name)
    pos += _pwrite_all(out, tail.getvalue(), pos)
    return WriteSummary(records, pos)


def _head(f: io.BytesIO, config: DomainConfig, xen_version: tuple[int, int], pad: int = 0) -> bytes:
    """xl header, libxl header, LIBXC_CONTEXT and the libxc headers, up to the first page."""
    savefile.write_header(f, config, pad=pad)
    stream.write_header(f)
    stream.write_record(f, RecordType.LIBXC_CONTEXT)
    memory_stream.write_headers(f, *xen_version)
    return f.getvalue()


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


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
            # libxl_stream_read.c hands the body past the emulator sub-header to
            # libxl__restore_emulator_xenstore_data without looking at the emulator id.
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


def restore_pages(
    image: int,
    memory: MemoryImage,
    frame_offsets: Mapping[int, int],
    mem: int,
    *,
    frames_zeroed: bool,
) -> int:
    """Copy every page of ``memory`` from the image file ``image`` (a descriptor) into the
    memory file ``mem`` at ``frame_offsets[pfn]``; returns the pages restored.

    With ``frames_zeroed`` (frames fresh from ``populate_physmap``, which hands out scrubbed
    pages) the holes of the image, pages that were all zeros when saved, are not copied.
    """
    size = os.fstat(image).st_size
    src = DataRuns(image, size) if frames_zeroed else DataRuns.dense(size)
    pages = 0
    for rec in memory.records:
        if not rec.data_pfns:
            continue
        try:
            offsets = [frame_offsets[p] for p in rec.data_pfns]
        except KeyError as exc:
            raise StreamError(f"pfn 0x{exc.args[0]:x} has no frame to restore into") from None
        at = rec.data_offset
        if at + len(offsets) * PAGE_SIZE > size:
            raise StreamError("truncated: PAGE_DATA page contents", at)
        for ext in coalesce(offsets):
            for off, length in src.pieces(at, ext.length):
                copy_range(image, off, mem, ext.offset + off - at, length)
            at += ext.length
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
    "restore_pages",
    "save_image",
    "write_image",
]

"""Guest memory inside ``LIBXC_CONTEXT``: the libxc migration stream v2 subset a simulated HVM
guest needs.

Layout (Xen ``docs/specs/libxc-migration-stream.pandoc``, ``xc_sr_stream_format.h``):

- image header: ``marker`` (u64, all ones), ``id`` (u32, "XENF"), ``version`` (u32, 3),
  ``options`` (u16, bit 0 = endianness), two reserved fields (u16, u32); big-endian;
- domain header: ``type`` (u32, 2 = x86 HVM), ``page_shift`` (u16, 12), reserved (u16),
  ``xen_major`` and ``xen_minor`` (u32 each);
- records of ``type`` and ``length`` (u32 each), bodies 8-aligned: ``PAGE_DATA`` is ``count``
  (u32), reserved (u32), ``count`` pfns (u64, page type in bits 60-63) and then the contents of
  every page whose type carries data, in pfn order; ``STATIC_DATA_END`` is empty; ``END`` closes
  the stream.

A record holds at most :data:`BATCH_PAGES` pages; the toolstack's writer
(:func:`toolstack.image.save_image`) uses :data:`ALIGNED_BATCH_PAGES`, which keeps page contents
on 4 KiB boundaries of the image.  :func:`page_data_header` builds a record's header and pfn
array and the contents are copied file to file, so no per-page Python work is done on them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO, Final

from .stream import Chunk, padding
from .streamio import ImageReader, StreamError

MARKER: Final = 0xFFFFFFFFFFFFFFFF
IDENT: Final = 0x58454E46  # "XENF"
VERSION: Final = 3
OPT_BIG_ENDIAN: Final = 1 << 0
DOMAIN_TYPE_X86_HVM: Final = 0x00000002
DOMAIN_TYPE_X86_PV: Final = 0x00000001
PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

IMAGE_HEADER: Final = struct.Struct(">QIIHHI")
DOMAIN_HEADER: Final = struct.Struct("<IHHII")
RECORD_HEADER: Final = struct.Struct("<II")
PAGE_DATA_HEADER: Final = struct.Struct("<II")

#: libxc's MAX_BATCH_SIZE: 1024 pages, 4 MiB of contents per PAGE_DATA record.
BATCH_PAGES: Final = 1024
#: libxc's REC_LENGTH_MAX.
RECORD_LENGTH_MAX: Final = 128 << 20

PFN_MASK: Final = (1 << 52) - 1
PFN_RESERVED_MASK: Final = ((1 << 60) - 1) & ~PFN_MASK
TYPE_SHIFT: Final = 60


class PageType(IntEnum):
    """The XEN_DOMCTL_PFINFO_* value in bits 60-63 of a PAGE_DATA pfn (xen/public/domctl.h);
    a page table may carry LPINTAB (0x8, pinned) on top of its level."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    LPINTAB = 0x8
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


#: What libxc's restore does with each known type (xg_sr_common.h: is_known_page_type(),
#: page_type_has_stream_data(), page_type_to_populate()).  Ordinary pages and page tables,
#: pinned or not, carry a page of data and are populated; XALLOC is populated without data;
#: XTAB (no page there) and BROKEN carry nothing and are not populated.  Types 0x5-0x8 are
#: unknown.  An HVM restore ignores the table levels (xg_sr_restore_x86_hvm.c:
#: x86_hvm_set_page_type() is a no-op), so here a page table is a page of data.
_WITH_DATA: Final = frozenset({0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC})
_NO_DATA: Final = frozenset({PageType.BROKEN, PageType.XALLOC, PageType.XTAB})


class MemRecordType(IntEnum):
    END = 0x00000000
    PAGE_DATA = 0x00000001
    X86_PV_INFO = 0x00000002
    X86_PV_P2M_FRAMES = 0x00000003
    X86_PV_VCPU_BASIC = 0x00000004
    X86_PV_VCPU_EXTENDED = 0x00000005
    X86_PV_VCPU_XSAVE = 0x00000006
    SHARED_INFO = 0x00000007
    X86_TSC_INFO = 0x00000008
    HVM_CONTEXT = 0x00000009
    HVM_PARAMS = 0x0000000A
    TOOLSTACK = 0x0000000B
    X86_PV_VCPU_MSRS = 0x0000000C
    VERIFY = 0x0000000D
    CHECKPOINT = 0x0000000E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0000000F
    STATIC_DATA_END = 0x00000010
    X86_CPUID_POLICY = 0x00000011
    X86_MSR_POLICY = 0x00000012


# --------------------------------------------------------------------------------------------
# Writing


def write_headers(f: BinaryIO, xen_major: int = 4, xen_minor: int = 17) -> int:
    """Image header, domain header and ``STATIC_DATA_END`` (a v3 stream's static section,
    empty here: the simulated hypervisor has no CPUID or MSR policy to send)."""
    n = f.write(IMAGE_HEADER.pack(MARKER, IDENT, VERSION, 0, 0, 0))
    n += f.write(DOMAIN_HEADER.pack(DOMAIN_TYPE_X86_HVM, PAGE_SHIFT, 0, xen_major, xen_minor))
    n += f.write(RECORD_HEADER.pack(MemRecordType.STATIC_DATA_END, 0))
    return n


def write_page_data(
    f: BinaryIO, pfns: Sequence[int], contents: Iterable[Chunk], xtab: Sequence[int] = ()
) -> int:
    """One ``PAGE_DATA`` record of ordinary pages: ``contents`` are the pages of ``pfns`` in
    order, as any number of pieces (typically one memoryview per run of adjacent frames);
    ``xtab`` are pfns sent as XTAB, pages that no longer exist, with no data."""
    pieces = [memoryview(c).cast("B") for c in contents]
    data_len = sum(len(p) for p in pieces)
    if data_len != len(pfns) * PAGE_SIZE:
        raise ValueError(
            f"{len(pfns)} pages need {len(pfns) * PAGE_SIZE} bytes of contents, got {data_len}"
        )
    n = f.write(page_data_header(pfns, xtab))
    for p in pieces:
        n += f.write(p)
    return n


def page_data_header(pfns: Sequence[int], xtab: Sequence[int] = ()) -> bytes:
    """Record header, ``PAGE_DATA`` header and pfn array of a record of ordinary pages whose
    ``len(pfns)`` pages of contents follow, then the ``xtab`` pfns, which carry none (as
    libxc's write_batch() in xg_sr_save.c sends the pages it found no frame for)."""
    count = len(pfns) + len(xtab)
    if count < 1:
        raise ValueError("a PAGE_DATA record needs at least one pfn")
    if count > BATCH_PAGES:
        raise ValueError(f"a PAGE_DATA record holds at most {BATCH_PAGES} pfns, not {count}")
    every = [*pfns, *xtab]
    lo, hi = min(every), max(every)
    if lo < 0 or hi > PFN_MASK:
        bad = lo if lo < 0 else hi
        raise ValueError(f"pfn 0x{bad:x} does not fit in 52 bits")
    length = PAGE_DATA_HEADER.size + 8 * count + PAGE_SIZE * len(pfns)
    # NOTAB is 0, so a plain pfn already carries the "ordinary page" type.
    words = [*pfns, *(p | PageType.XTAB << TYPE_SHIFT for p in xtab)]
    return (
        RECORD_HEADER.pack(MemRecordType.PAGE_DATA, length)
        + PAGE_DATA_HEADER.pack(count, 0)
        + struct.pack(f"<{count}Q", *words)
    )


def write_end(f: BinaryIO) -> int:
    return f.write(RECORD_HEADER.pack(MemRecordType.END, 0))


# --------------------------------------------------------------------------------------------
# Planning: which file extents hold which pages


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes at ``offset`` of the guest's memory file."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class PageBatch:
    pfns: tuple[int, ...]
    extents: tuple[Extent, ...]


def coalesce(offsets: Sequence[int]) -> list[Extent]:
    """Runs of frames that are adjacent in the memory file, as extents."""
    if offsets and offsets[0] >= 0:
        # The usual case, one run, is recognised by a single list comparison.
        first = offsets[0]
        run = range(first, first + len(offsets) * PAGE_SIZE, PAGE_SIZE)
        if list(offsets) == list(run):
            return [Extent(first, len(offsets) * PAGE_SIZE)]
    extents: list[Extent] = []
    start = prev = -1
    for off in offsets:
        if off < 0:
            raise ValueError(f"frame offset {off} is not a mapped frame")
        if start >= 0 and off == prev + PAGE_SIZE:
            prev = off
            continue
        if start >= 0:
            extents.append(Extent(start, prev + PAGE_SIZE - start))
        start = prev = off
    if start >= 0:
        extents.append(Extent(start, prev + PAGE_SIZE - start))
    return extents


def plan_batches(
    pfns: Sequence[int],
    offsets: Sequence[int],
    batch_pages: int = BATCH_PAGES,
    first_batch: int | None = None,
) -> Iterator[PageBatch]:
    """Split ``pfns`` (whose frames are at ``offsets`` of the memory file) into PAGE_DATA
    batches of ``batch_pages`` (the first of ``first_batch``), each with the file extents to
    copy."""
    if len(pfns) != len(offsets):
        raise ValueError("pfns and offsets differ in length")
    i = 0
    size = first_batch or batch_pages
    while i < len(pfns):
        yield PageBatch(tuple(pfns[i : i + size]), tuple(coalesce(offsets[i : i + size])))
        i += size
        size = batch_pages


#: Pages per record that keep page contents 4 KiB-aligned in the image: a record of 1022
#: pages has 8 + 8 + 8 * 1022 = 8192 octets of headers and pfns in front of its contents.
ALIGNED_BATCH_PAGES: Final = 1022


def aligned_first_batch(offset: int) -> int:
    """Pages in a first record starting at ``offset`` (8-aligned) that bring its contents,
    and so those of every :data:`ALIGNED_BATCH_PAGES` record after it, to a page boundary."""
    if offset % 8:
        raise ValueError(f"a record offset of {offset} is not 8-aligned")
    count = (-(offset + RECORD_HEADER.size + PAGE_DATA_HEADER.size) % PAGE_SIZE) // 8
    return count or PAGE_SIZE // 8


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class DomainHeader:
    type: int
    page_shift: int
    xen_major: int
    xen_minor: int


@dataclass(frozen=True, slots=True)
class PageDataRecord:
    """A ``PAGE_DATA`` record as found in the file: ``data_pfns`` are the pages whose contents
    start at ``data_offset``, in order; ``alloc_pfns`` (XALLOC) are populated but carry no
    data; ``absent_pfns`` (XTAB, BROKEN) carry nothing and are not populated."""

    data_pfns: tuple[int, ...]
    alloc_pfns: tuple[int, ...]
    data_offset: int
    absent_pfns: tuple[int, ...] = ()


@dataclass(slots=True)
class MemoryImage:
    """What :func:`read_memory_stream` found."""

    domain: DomainHeader
    records: list[PageDataRecord] = field(default_factory=list)

    def pfns(self) -> list[int]:
        """Every pfn the restored domain needs populated, each once, ascending.

        As libxc's ``populate_pfns()`` (xg_sr_restore.c) does record by record: a pfn with data
        or XALLOC in any record is populated; an XTAB or BROKEN pfn is not, unless another
        record populates it (a frame once populated is never given back, so a page sent in
        an early pre-copy round and XTAB in a later one keeps the data it was last sent with).
        """
        seen: set[int] = set()
        for rec in self.records:
            seen.update(rec.data_pfns)
            seen.update(rec.alloc_pfns)
        return sorted(seen)

    @property
    def page_count(self) -> int:
        return sum(len(r.data_pfns) for r in self.records)


def _read_record_header(r: ImageReader) -> tuple[int, int, int]:
    start = r.offset
    rtype, length = RECORD_HEADER.unpack(r.read(RECORD_HEADER.size, "libxc record header"))
    try:
        name = MemRecordType(rtype).name
    except ValueError:
        raise StreamError(f"unrecognised libxc record type 0x{rtype:08x}", start) from None
    if length > RECORD_LENGTH_MAX:
        raise StreamError(
            f"libxc {name} record claims {length} bytes, over the {RECORD_LENGTH_MAX} limit", start
        )
    r.need(length + padding(length), f"libxc {name} record body of {length} bytes")
    return rtype, length, start


def _parse_page_data(r: ImageReader, length: int, start: int) -> PageDataRecord:
    if length < PAGE_DATA_HEADER.size + 8:
        raise StreamError(f"PAGE_DATA record of {length} bytes holds no pfn", start)
    count, reserved = PAGE_DATA_HEADER.unpack(r.read(PAGE_DATA_HEADER.size, "PAGE_DATA header"))
    if reserved:
        raise StreamError("PAGE_DATA reserved field is not zero", start)
    if count < 1:
        raise StreamError("PAGE_DATA record with a count of 0", start)
    if length < PAGE_DATA_HEADER.size + 8 * count:
        raise StreamError(
            f"PAGE_DATA record of {length} bytes is too short for {count} pfns", start
        )
    raw = struct.unpack(f"<{count}Q", r.read(8 * count, "PAGE_DATA pfns"))
    data: list[int] = []
    alloc: list[int] = []
    absent: list[int] = []
    if max(raw) <= PFN_MASK:
        # Every word is a plain pfn (type NOTAB, no reserved bits): all pages carry data.
        data = list(raw)
        raw = ()
    for i, word in enumerate(raw):
        if word & PFN_RESERVED_MASK:
            raise StreamError(f"PAGE_DATA pfn[{i}] 0x{word:016x} has reserved bits set", start)
        ptype = word >> TYPE_SHIFT
        pfn = word & PFN_MASK
        if ptype in _WITH_DATA:
            data.append(pfn)
        elif ptype == PageType.XALLOC:
            alloc.append(pfn)
        elif ptype in _NO_DATA:
            absent.append(pfn)
        else:
            raise StreamError(f"PAGE_DATA pfn[{i}] has unknown page type 0x{ptype:x}", start)
    expected = PAGE_DATA_HEADER.size + 8 * count + PAGE_SIZE * len(data)
    if length != expected:
        raise StreamError(
            f"PAGE_DATA record of {length} bytes should be {expected} for {count} pfns "
            f"with {len(data)} pages of data",
            start,
        )
    data_offset = r.offset
    r.skip(PAGE_SIZE * len(data), "PAGE_DATA page contents")
    return PageDataRecord(tuple(data), tuple(alloc), data_offset, tuple(absent))


def read_page_data(r: ImageReader) -> PageDataRecord:
    """One whole ``PAGE_DATA`` record at the reader's offset, checked as
    :func:`read_memory_stream` checks it; its contents are skipped, not read."""
    rtype, length, start = _read_record_header(r)
    if rtype != MemRecordType.PAGE_DATA:
        raise StreamError(f"libxc {MemRecordType(rtype).name} record where PAGE_DATA was", start)
    return _parse_page_data(r, length, start)


def read_memory_stream(r: ImageReader) -> MemoryImage:
    """Check a whole libxc stream and index its pages; page contents are skipped, not read."""
    start = r.offset
    marker, ident, version, options, res1, res2 = IMAGE_HEADER.unpack(
        r.read(IMAGE_HEADER.size, "libxc image header")
    )
    if marker != MARKER or ident != IDENT:
        raise StreamError("bad libxc image header magic (expected marker and 'XENF')", start)
    if version not in (2, 3):
        raise StreamError(f"unsupported libxc stream version {version} (expected 2 or 3)", start)
    if options & ~OPT_BIG_ENDIAN or res1 or res2:
        raise StreamError("reserved bits set in the libxc image header", start)
    if options & OPT_BIG_ENDIAN:
        raise StreamError("big-endian libxc streams are not supported on this host", start)
    dstart = r.offset
    dtype, page_shift, dres, major, minor = DOMAIN_HEADER.unpack(
        r.read(DOMAIN_HEADER.size, "libxc domain header")
    )
    if dtype != DOMAIN_TYPE_X86_HVM:
        raise StreamError(f"domain type 0x{dtype:x} is not x86 HVM", dstart)
    if page_shift != PAGE_SHIFT or dres:
        raise StreamError(f"domain header page_shift {page_shift} is not {PAGE_SHIFT}", dstart)
    image = MemoryImage(DomainHeader(dtype, page_shift, major, minor))
    while True:
        rtype, length, rstart = _read_record_header(r)
        if rtype == MemRecordType.END:
            if length:
                raise StreamError("libxc END record has a body", rstart)
            return image
        if rtype == MemRecordType.PAGE_DATA:
            image.records.append(_parse_page_data(r, length, rstart))
        elif rtype == MemRecordType.STATIC_DATA_END:
            if length:
                raise StreamError("libxc STATIC_DATA_END record has a body", rstart)
        else:
            raise StreamError(
                f"libxc {MemRecordType(rtype).name} records are not supported by this toolstack",
                rstart,
            )
        pad = padding(length)
        if pad and any(r.read(pad, "libxc record padding")):
            raise StreamError("libxc record padding is not zero", rstart)

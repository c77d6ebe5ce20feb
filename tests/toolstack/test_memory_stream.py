"""Guest memory inside LIBXC_CONTEXT: the libxc stream v2 subset (libxc-migration-stream.pandoc)."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolstack import memory_stream as ms
from toolstack.memory_stream import PAGE_SIZE, Extent
from toolstack.streamio import ImageReader, StreamError


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def build(batches: list[tuple[list[int], list[bytes]]]) -> bytes:
    f = io.BytesIO()
    ms.write_headers(f)
    for pfns, contents in batches:
        ms.write_page_data(f, pfns, contents)
    ms.write_end(f)
    return f.getvalue()


def read(data: bytes) -> ms.MemoryImage:
    return ms.read_memory_stream(ImageReader(io.BytesIO(data)))


def test_headers_match_the_libxc_layout() -> None:
    data = build([])
    marker, ident, version, options, r1, r2 = struct.unpack_from(">QIIHHI", data)
    assert (marker, ident, version, options, r1, r2) == (2**64 - 1, 0x58454E46, 3, 0, 0, 0)
    assert struct.unpack_from("<IHHII", data, 24) == (2, 12, 0, 4, 17)
    # STATIC_DATA_END then END, both empty.
    assert data[40:] == struct.pack("<IIII", 0x10, 0, 0, 0)


def test_pages_are_indexed_and_their_contents_skipped() -> None:
    data = build([([5, 6, 100], [page(1) + page(2), page(3)]), ([7], [page(4)])])
    image = read(data)
    assert image.pfns() == [5, 6, 7, 100]
    assert image.page_count == 4
    first = image.records[0]
    assert first.data_pfns == (5, 6, 100)
    assert data[first.data_offset : first.data_offset + PAGE_SIZE] == page(1)


@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=40, unique=True))
def test_round_trip_of_pfns(pfns: list[int]) -> None:
    contents = [pfn.to_bytes(4, "little") * (PAGE_SIZE // 4) for pfn in pfns]
    batches = [(pfns[i : i + 7], contents[i : i + 7]) for i in range(0, len(pfns), 7)]
    image = read(build(batches))
    assert [p for r in image.records for p in r.data_pfns] == pfns


def test_write_refuses_contents_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="need 8192 bytes"):
        ms.write_page_data(io.BytesIO(), [1, 2], [page(0)])
    with pytest.raises(ValueError, match="at least one pfn"):
        ms.write_page_data(io.BytesIO(), [], [])


def _page_data_record(count: int, pfns: list[int], pages: int, length: int | None = None) -> bytes:
    body = (
        struct.pack("<II", count, 0)
        + struct.pack(f"<{len(pfns)}Q", *pfns)
        + bytes(pages * PAGE_SIZE)
    )
    return struct.pack("<II", 1, len(body) if length is None else length) + body


def _stream_with(record: bytes) -> bytes:
    head = build([])[:-8]  # without END
    return head + record + struct.pack("<II", 0, 0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_page_data_record(2, [1, 2], 1), "should be 8216"),
        (_page_data_record(1, [1 | (1 << 55)], 1), "reserved bits"),
        (_page_data_record(1, [1 | (0x5 << 60)], 1), "unknown page type 0x5"),
        (_page_data_record(1, [1 | (0x8 << 60)], 1), "unknown page type 0x8"),
        (_page_data_record(2, [1 | (0xD << 60), 2], 2), "should be 4120"),
        (_page_data_record(3, [1], 0), "too short for 3 pfns"),
        (_page_data_record(0, [], 0), "holds no pfn"),
        (struct.pack("<II", 9, 0), "HVM_CONTEXT records are not supported"),
        (struct.pack("<II", 0x99, 0), "unrecognised libxc record type"),
    ],
)
def test_malformed_page_records_are_rejected(record: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        read(_stream_with(record))


def test_xalloc_and_xtab_pages_carry_no_data() -> None:
    words = [3 | (0xE << 60), 4 | (0xF << 60), 5]
    image = read(_stream_with(_page_data_record(3, words, 1)))
    assert image.records[0].data_pfns == (5,)
    assert image.records[0].alloc_pfns == (3,)
    assert image.records[0].absent_pfns == (4,)
    assert image.pfns() == [3, 5]


def test_broken_pages_carry_no_data_and_are_not_populated() -> None:
    """libxc's restore takes BROKEN like XTAB (xg_sr_common.h: page_type_has_stream_data(),
    page_type_to_populate()): a known type, no page of data, nothing populated."""
    words = [7 | (0xD << 60), 8 | (0xF << 60), 9]
    image = read(_stream_with(_page_data_record(3, words, 1)))
    assert image.records[0].data_pfns == (9,)
    assert image.records[0].absent_pfns == (7, 8)
    assert image.pfns() == [9]


@pytest.mark.parametrize("ptype", [0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC])
def test_page_tables_are_pages_of_data_to_an_hvm_restore(ptype: int) -> None:
    """Page tables, pinned (LPINTAB) or not, are known types with data; an HVM restore sets
    no type on them (xg_sr_restore_x86_hvm.c: x86_hvm_set_page_type())."""
    image = read(_stream_with(_page_data_record(2, [1 | (ptype << 60), 2], 2)))
    assert image.records[0].data_pfns == (1, 2)
    assert image.pfns() == [1, 2]


def test_a_page_sent_then_xtab_keeps_its_last_data() -> None:
    """Pre-copy sends pfn 6 in round one; in a later round it no longer exists (XTAB).  libxc's
    populate_pfns() never gives a frame back, so pfn 6 stays populated with what round one
    sent, while pfn 10, XTAB only, is never populated."""
    first = _page_data_record(2, [5, 6], 2)
    later = _page_data_record(3, [6 | (0xF << 60), 10 | (0xF << 60), 11], 1)
    head = build([])[:-8]
    image = read(head + first + later + struct.pack("<II", 0, 0))
    assert [r.data_pfns for r in image.records] == [(5, 6), (11,)]
    assert [r.absent_pfns for r in image.records] == [(), (6, 10)]
    assert image.pfns() == [5, 6, 11]


@given(
    st.lists(
        st.tuples(st.integers(0, 60), st.sampled_from([0x0, 0x1, 0x9, 0xD, 0xE, 0xF])),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 8),
)
def test_pfns_are_what_libxc_would_populate(words: list[tuple[int, int]], size: int) -> None:
    """Against a model of libxc's restore: records in order, each pfn populated the first time
    a record gives it a type to populate; the page count is the pages of data."""
    batches = [words[i : i + size] for i in range(0, len(words), size)]
    records = b""
    for batch in batches:
        with_data = sum(t not in (0xD, 0xE, 0xF) for _, t in batch)
        records += _page_data_record(len(batch), [p | (t << 60) for p, t in batch], with_data)
    image = read(build([])[:-8] + records + struct.pack("<II", 0, 0))
    populated: set[int] = set()
    for batch in batches:
        populated |= {p for p, t in batch if t not in (0xD, 0xF)}
    assert image.pfns() == sorted(populated)
    assert image.page_count == sum(t not in (0xD, 0xE, 0xF) for _, t in words)


def test_truncated_libxc_stream_is_rejected() -> None:
    data = build([([1], [page(9)])])
    for cut in (10, 30, 48, 60, len(data) - 100, len(data) - 1):
        with pytest.raises(StreamError, match="truncated"):
            read(data[:cut])


def test_bad_libxc_magic_and_domain_type() -> None:
    data = bytearray(build([]))
    data[9] ^= 0xFF
    with pytest.raises(StreamError, match="bad libxc image header magic"):
        read(bytes(data))
    data = bytearray(build([]))
    data[24] = 1  # x86 PV
    with pytest.raises(StreamError, match="not x86 HVM"):
        read(bytes(data))


def test_coalesce_joins_adjacent_frames_only() -> None:
    offsets = [0, 4096, 8192, 40960, 45056, 4096 * 3]
    assert ms.coalesce(offsets) == [Extent(0, 3 * 4096), Extent(40960, 8192), Extent(12288, 4096)]
    assert ms.coalesce([]) == []
    with pytest.raises(ValueError, match="not a mapped frame"):
        ms.coalesce([-1])


@given(st.lists(st.integers(0, 500), max_size=300), st.integers(1, 64))
def test_plan_batches_covers_every_page_once(frames: list[int], batch: int) -> None:
    offsets = [f * PAGE_SIZE for f in frames]
    pfns = list(range(len(frames)))
    got_pfns: list[int] = []
    got_offsets: list[int] = []
    for b in ms.plan_batches(pfns, offsets, batch):
        assert 1 <= len(b.pfns) <= batch
        got_pfns.extend(b.pfns)
        for e in b.extents:
            got_offsets.extend(range(e.offset, e.offset + e.length, PAGE_SIZE))
    assert got_pfns == pfns
    assert got_offsets == offsets

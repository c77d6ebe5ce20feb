"""Descriptor-level save and restore of guest memory: copy_file_range between the memory file
and the image, holes left as holes, the same image bytes as the stream writer."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolstack import memory_stream as ms
from toolstack.config import DomainConfig
from toolstack.image import read_image, restore_pages, save_image, write_image
from toolstack.memory_stream import PAGE_SIZE
from toolstack.streamio import DataRuns, StreamError, copy_range

ROOT = Path(__file__).resolve().parents[2]
XEN_ROOT = (
    Path(os.environ.get("PHYSMAP_LAB_XEN_ROOT", ROOT / ".cache" / "xen-utils-4.17"))
    / "usr/lib/xen-4.17"
)
CONFIG = DomainConfig(name="vm", memory_mib=1, vga="stdvga", dm_mode="compat")
PAIRS = [("physmap/1f00000/start_addr", "f0000000"), ("physmap/1f00000/size", "800000")]


def content(frame: int) -> bytes:
    return (frame + 1).to_bytes(8, "little") * (PAGE_SIZE // 8)


def memory_file(path: Path, nframes: int, written: set[int]) -> int:
    """A sparse memory file of ``nframes`` frames where only ``written`` hold data."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, nframes * PAGE_SIZE)
    for frame in written:
        os.pwrite(fd, content(frame), frame * PAGE_SIZE)
    return fd


def expected_page(frame: int, written: set[int]) -> bytes:
    return content(frame) if frame in written else bytes(PAGE_SIZE)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def save(tmp: Path, pfns: list[int], frames: list[int], written: set[int], nframes: int) -> Path:
    mem = memory_file(tmp / "mem", nframes, written)
    (tmp / "state").write_bytes(b"device state")
    image = tmp / "vm.img"
    with open(tmp / "state", "rb") as state, open(image, "wb") as out:
        summary = save_image(
            out.fileno(),
            CONFIG,
            pfns,
            [f * PAGE_SIZE for f in frames],
            mem,
            PAIRS,
            state.fileno(),
        )
    os.close(mem)
    assert summary.bytes == image.stat().st_size
    return image


def pages_of(data: bytes) -> dict[int, bytes]:
    """pfn -> page contents, as an image's index finds them."""
    index = read_image(io.BytesIO(data))
    assert index.memory is not None
    out: dict[int, bytes] = {}
    for rec in index.memory.records:
        for k, pfn in enumerate(rec.data_pfns):
            at = rec.data_offset + k * PAGE_SIZE
            out[pfn] = data[at : at + PAGE_SIZE]
    return out


def reference(pfns: list[int], frames: list[int], written: set[int]) -> bytes:
    """The same guest from the stream writer, page contents passed as bytes."""
    pages = [expected_page(f, written) for f in frames]
    batches = [
        (pfns[i : i + ms.BATCH_PAGES], pages[i : i + ms.BATCH_PAGES])
        for i in range(0, len(pfns), ms.BATCH_PAGES)
    ]
    f = io.BytesIO()
    write_image(f, CONFIG, batches, PAIRS, io.BytesIO(b"device state"))
    return f.getvalue()


def test_save_image_holds_what_the_stream_writer_holds_page_aligned_and_sparse(
    files: Path,
) -> None:
    # 2100 pages: three PAGE_DATA records; frames mostly in order with one jump back.
    frames = [*range(600), *range(1200, 2500), *range(600, 800)]
    pfns = [*range(2000), *range(0xF0000, 0xF0000 + 100)]
    written = set(range(0, 50)) | set(range(1250, 1260)) | {700, 2499}
    image = save(files, pfns, frames, written, 2500)
    data = image.read_bytes()
    ref = reference(pfns, frames, written)
    assert pages_of(data) == pages_of(ref)
    got, want = read_image(io.BytesIO(data)), read_image(io.BytesIO(ref))
    assert (got.config, got.records, got.xenstore) == (want.config, want.records, want.xenstore)
    assert got.memory is not None
    # Every record's contents but the last's start on a page boundary of the image; all but
    # the first and last records hold ALIGNED_BATCH_PAGES pages.
    assert all(r.data_offset % PAGE_SIZE == 0 for r in got.memory.records[:-1])
    counts = [len(r.data_pfns) for r in got.memory.records]
    assert sum(counts) == len(pfns) and counts[1] == ms.ALIGNED_BATCH_PAGES
    assert max(counts) <= ms.BATCH_PAGES
    # Most frames were never written, so most of the image is holes.
    with open(image, "rb") as f:
        runs = DataRuns(f.fileno())
    assert runs.data_bytes < len(data) // 4


@given(st.integers(0, 1 << 20).map(lambda n: 8 * n))
def test_aligned_first_batch_puts_contents_on_a_page_boundary(offset: int) -> None:
    count = ms.aligned_first_batch(offset)
    assert 1 <= count <= ms.BATCH_PAGES
    assert (offset + len(ms.page_data_header(list(range(count))))) % PAGE_SIZE == 0
    header = len(ms.page_data_header(list(range(ms.ALIGNED_BATCH_PAGES))))
    assert header % PAGE_SIZE == 0


def restore(image: Path, mem_path: Path, nframes: int, shuffle: list[int], zeroed: bool) -> int:
    with open(image, "rb") as f:
        index = read_image(f)
        assert index.memory is not None
        pfns = index.memory.pfns()
        frame_of = {pfn: shuffle[i] * PAGE_SIZE for i, pfn in enumerate(pfns)}
        mem = os.open(mem_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if zeroed:
                os.ftruncate(mem, nframes * PAGE_SIZE)
            else:
                # Frames full of junk: only a copy of every page, holes included, is right.
                os.pwrite(mem, b"\xee" * nframes * PAGE_SIZE, 0)
            return restore_pages(f.fileno(), index.memory, frame_of, mem, frames_zeroed=zeroed)
        finally:
            os.close(mem)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.integers(0, 63), min_size=1, max_size=40, unique=True),
    st.sets(st.integers(0, 63)),
    st.permutations(range(64)),
    st.booleans(),
)
def test_restore_pages_puts_every_page_in_its_new_frame(
    files: Path, frames: list[int], written: set[int], shuffle: list[int], zeroed: bool
) -> None:
    pfns = [0x100 + 3 * f for f in frames]  # saved in frame order, not pfn order
    image = save(files, pfns, frames, written, 64)
    assert restore(image, files / "new.mem", 64, shuffle, zeroed) == len(pfns)
    restored = (files / "new.mem").read_bytes()
    by_pfn = dict(zip(pfns, frames, strict=True))
    for i, pfn in enumerate(sorted(pfns)):
        at = shuffle[i] * PAGE_SIZE
        assert restored[at : at + PAGE_SIZE] == expected_page(by_pfn[pfn], written)


def test_restore_of_a_truncated_image_is_refused(files: Path) -> None:
    image = save(files, [0, 1, 2], [0, 1, 2], {0, 1, 2}, 3)
    with open(image, "rb") as f:
        index = read_image(f)
    assert index.memory is not None
    cut = index.memory.records[0].data_offset + PAGE_SIZE
    os.truncate(image, cut)
    mem = os.open(files / "m", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with open(image, "rb") as f, pytest.raises(StreamError, match="truncated"):
            restore_pages(
                f.fileno(), index.memory, {0: 0, 1: 4096, 2: 8192}, mem, frames_zeroed=True
            )
        with open(image, "rb") as f, pytest.raises(StreamError, match="no frame"):
            restore_pages(f.fileno(), index.memory, {0: 0}, mem, frames_zeroed=False)
    finally:
        os.close(mem)


def test_data_runs_report_only_written_ranges(files: Path) -> None:
    fd = memory_file(files / "m", 16, {2, 3, 9})
    try:
        runs = DataRuns(fd)
        assert runs.data_bytes == 3 * PAGE_SIZE
        assert list(runs.pieces(0, 16 * PAGE_SIZE)) == [
            (2 * PAGE_SIZE, 2 * PAGE_SIZE),
            (9 * PAGE_SIZE, PAGE_SIZE),
        ]
        assert list(runs.pieces(3 * PAGE_SIZE + 100, 7 * PAGE_SIZE)) == [
            (3 * PAGE_SIZE + 100, PAGE_SIZE - 100),
            (9 * PAGE_SIZE, PAGE_SIZE),
        ]
        assert list(runs.pieces(4 * PAGE_SIZE, 5 * PAGE_SIZE)) == []
        assert list(DataRuns.dense(100).pieces(10, 20)) == [(10, 20)]
    finally:
        os.close(fd)


def test_copy_range_falls_back_when_the_kernel_refuses(
    files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = memory_file(files / "s", 300, set(range(300)))
    dst = os.open(files / "d", os.O_RDWR | os.O_CREAT, 0o600)

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    try:
        monkeypatch.setattr(os, "copy_file_range", refuse)
        copy_range(src, 5 * PAGE_SIZE + 7, dst, 3, 290 * PAGE_SIZE)
        got = os.pread(dst, 290 * PAGE_SIZE, 3)
        want = os.pread(src, 290 * PAGE_SIZE, 5 * PAGE_SIZE + 7)
        assert got == want
        with pytest.raises(StreamError, match="truncated"):
            copy_range(src, 299 * PAGE_SIZE, dst, 0, 2 * PAGE_SIZE)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_range_reports_a_short_source(files: Path) -> None:
    src = memory_file(files / "s", 2, {0, 1})
    dst = os.open(files / "d", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(StreamError, match="truncated"):
            copy_range(src, PAGE_SIZE, dst, 0, 2 * PAGE_SIZE)
    finally:
        os.close(src)
        os.close(dst)


def test_page_data_header_keeps_within_libxc_limits() -> None:
    with pytest.raises(ValueError, match="at most 1024"):
        ms.page_data_header(list(range(1025)))
    with pytest.raises(ValueError, match="52 bits"):
        ms.page_data_header([1 << 52])
    with pytest.raises(ValueError, match="52 bits"):
        ms.page_data_header([-1])


@pytest.mark.integration
def test_saved_images_pass_xens_own_verify_stream_v2(files: Path) -> None:
    """Differential check of a descriptor-written image against Xen's verifier (no
    EMULATOR_XENSTORE_DATA: its Python 3 port mis-compares that record, see test_image.py)."""
    tool = XEN_ROOT / "bin" / "verify-stream-v2"
    assert tool.exists(), f"{tool} is missing: run `make setup`"
    mem = memory_file(files / "mem", 1100, set(range(0, 1100, 7)))
    (files / "state").write_bytes(b"qemu state")
    image = files / "vm.img"
    with open(files / "state", "rb") as state, open(image, "wb") as out:
        save_image(
            out.fileno(),
            CONFIG,
            list(range(1100)),
            [f * PAGE_SIZE for f in range(1100)],
            mem,
            [],
            state.fileno(),
        )
    os.close(mem)
    env = dict(os.environ, PYTHONPATH=str(XEN_ROOT / "lib" / "python"))
    proc = subprocess.run(
        [sys.executable, str(tool), "--format", "xl", "--in", str(image), "--verbose"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Squashed 2 Page Data records together" in proc.stdout

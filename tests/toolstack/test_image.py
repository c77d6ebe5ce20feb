"""Whole save images: xl header + libxl stream v2, written, validated, read back."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolstack import savefile
from toolstack.config import DomainConfig
from toolstack.image import copy_emulator_context, load_pages, read_image, write_image
from toolstack.memory_stream import PAGE_SIZE
from toolstack.streamio import StreamError

ROOT = Path(__file__).resolve().parents[2]
XEN_ROOT = (
    Path(os.environ.get("PHYSMAP_LAB_XEN_ROOT", ROOT / ".cache" / "xen-utils-4.17"))
    / "usr/lib/xen-4.17"
)

CONFIG = DomainConfig(name="vm", memory_mib=1, vga="stdvga", dm_mode="compat")
PHYSMAP = [
    ("physmap/1f00000/start_addr", "f0000000"),
    ("physmap/1f00000/size", "800000"),
    ("physmap/1f00000/name", "vga.vram"),
]


def pages_for(pfns: list[int]) -> list[bytes]:
    return [pfn.to_bytes(8, "little") * (PAGE_SIZE // 8) for pfn in pfns]


def make_image(
    pfns: list[int],
    pairs: list[tuple[str, str]] = PHYSMAP,
    ctx: bytes = b"device state",
    batch: int = 3,
) -> bytes:
    contents = pages_for(pfns)
    batches = [(pfns[i : i + batch], contents[i : i + batch]) for i in range(0, len(pfns), batch)]
    f = io.BytesIO()
    summary = write_image(f, CONFIG, batches, pairs, io.BytesIO(ctx))
    assert summary.bytes == len(f.getvalue())
    return f.getvalue()


def test_compat_image_has_the_libxl_record_order() -> None:
    data = make_image([0, 1, 2, 0xF0000])
    index = read_image(io.BytesIO(data))
    assert index.records == ["LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT", "END"]
    assert index.config == CONFIG
    assert index.xenstore is not None and list(index.xenstore.pairs) == PHYSMAP
    assert index.size == len(data)


def test_no_keys_means_no_xenstore_record() -> None:
    index = read_image(io.BytesIO(make_image([0, 1], pairs=[])))
    assert index.records == ["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"]
    assert index.xenstore is None


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=20, unique=True),
    st.binary(max_size=100),
    st.integers(1, 5),
    st.permutations(range(20)),
)
def test_round_trip_restores_every_page_and_the_device_state(
    pfns: list[int], ctx: bytes, batch: int, frame_order: list[int]
) -> None:
    data = make_image(pfns, ctx=ctx, batch=batch)
    index = read_image(io.BytesIO(data))
    assert index.memory is not None
    assert index.memory.pfns() == sorted(pfns)
    # Restore into frames in a shuffled order, as a fresh domain's p2m may be.
    frames = {pfn: frame_order[i] * PAGE_SIZE for i, pfn in enumerate(sorted(pfns))}
    dst = bytearray(20 * PAGE_SIZE)
    assert load_pages(io.BytesIO(data), index.memory, frames, memoryview(dst)) == len(pfns)
    for pfn, content in zip(pfns, pages_for(pfns), strict=True):
        assert dst[frames[pfn] : frames[pfn] + PAGE_SIZE] == content
    out = io.BytesIO()
    assert copy_emulator_context(io.BytesIO(data), index, out) == len(ctx)
    assert out.getvalue() == ctx


def hand_built_stream() -> bytes:
    """A libxl image assembled field by field from the specs, not with toolstack's writer."""
    config = json.dumps({"name": "legacy", "memory_mib": 1, "dm_mode": "compat"}).encode() + b"\0"
    optional = struct.pack("<I", len(config)) + config
    xl = b"Xen saved domain, xl format\n \0 \r" + struct.pack(
        "<IIII", 0x01020304, 3, 0, len(optional)
    )
    out = xl + optional
    out += struct.pack(">QII", 0x4C6962786C466D74, 2, 0)
    out += struct.pack("<II", 1, 0)  # LIBXC_CONTEXT
    out += struct.pack(">QIIHHI", 2**64 - 1, 0x58454E46, 2, 0, 0, 0)
    out += struct.pack("<IHHII", 2, 12, 0, 4, 9)
    body = struct.pack("<IIQ", 1, 0, 0xF0000) + b"\xab" * PAGE_SIZE
    out += struct.pack("<II", 1, len(body)) + body
    out += struct.pack("<II", 0, 0)  # libxc END
    xs = struct.pack("<II", 2, 0) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in PHYSMAP
    )
    out += struct.pack("<II", 2, len(xs)) + xs + bytes(-len(xs) % 8)
    ctx = struct.pack("<II", 2, 0) + b"qemu"
    out += struct.pack("<II", 3, len(ctx)) + ctx + bytes(-len(ctx) % 8)
    out += struct.pack("<II", 0, 0)
    return out


def test_hand_built_libxl_stream_with_a_physmap_record_parses() -> None:
    data = hand_built_stream()
    index = read_image(io.BytesIO(data))
    assert index.records == ["LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT", "END"]
    assert index.config is not None and index.config.name == "legacy"
    assert index.xenstore is not None and index.xenstore.as_dict() == dict(PHYSMAP)
    assert index.memory is not None and index.memory.pfns() == [0xF0000]
    assert index.memory.domain.xen_minor == 9
    out = io.BytesIO()
    copy_emulator_context(io.BytesIO(data), index, out)
    assert out.getvalue() == b"qemu"


def test_every_truncation_is_rejected() -> None:
    data = make_image([0, 5])
    for cut in range(len(data)):
        with pytest.raises(StreamError):
            read_image(io.BytesIO(data[:cut]))


def test_a_missing_end_is_named() -> None:
    data = make_image([0])
    with pytest.raises(StreamError, match="without an END record"):
        read_image(io.BytesIO(data[:-8]))


def test_trailing_data_after_end_is_rejected() -> None:
    with pytest.raises(StreamError, match="trailing data after the END"):
        read_image(io.BytesIO(make_image([0]) + bytes(8)))


def _libxl_start(data: bytes | bytearray) -> int:
    return data.index(b"LibxlFmt")


def test_bad_magics_are_rejected() -> None:
    data = bytearray(make_image([0]))
    data[0] ^= 1
    with pytest.raises(StreamError, match="not an xl save file"):
        read_image(io.BytesIO(bytes(data)))
    data = bytearray(make_image([0]))
    data[_libxl_start(data)] = ord("X")
    with pytest.raises(StreamError, match="bad libxl stream magic"):
        read_image(io.BytesIO(bytes(data)))


def test_a_bad_record_length_is_rejected() -> None:
    data = bytearray(make_image([0], ctx=b"0123456789"))
    # EMULATOR_CONTEXT's body_length, made to run past the END record and the file.
    at = data.rindex(struct.pack("<II", 3, 18))
    data[at + 4 : at + 8] = struct.pack("<I", 4000)
    with pytest.raises(StreamError, match="truncated"):
        read_image(io.BytesIO(bytes(data)))
    # A LIBXC_CONTEXT with a body breaks the spec (the libxc stream follows it inline).
    data = bytearray(make_image([0]))
    at = _libxl_start(data) + 16
    data[at + 4 : at + 8] = struct.pack("<I", 8)
    with pytest.raises(StreamError, match="LIBXC_CONTEXT record has a body"):
        read_image(io.BytesIO(bytes(data)))


def test_k5_absolute_key_and_unterminated_value_reject_the_whole_image() -> None:
    absolute = make_image([0]).replace(b"physmap/1f00000/name", b"/hysmap/1f00000/name")
    with pytest.raises(StreamError, match="not relative"):
        read_image(io.BytesIO(absolute))
    # Drop the final NUL of the last value: the record shrinks by one byte.
    data = bytearray(make_image([0]))
    at = data.index(b"vga.vram\0")
    record = data.index(b"physmap/") - 16  # record header, then the emulator sub-header
    rtype, length = struct.unpack_from("<II", data, record)
    assert rtype == 2
    data[record + 4 : record + 8] = struct.pack("<I", length - 1)
    data[at + 8] = 0  # now padding
    with pytest.raises(StreamError, match="not NUL terminated"):
        read_image(io.BytesIO(bytes(data)))


def test_libxl_stream_read_ignores_the_xenstore_data_emulator_id() -> None:
    """libxl_stream_read.c passes EMULATOR_XENSTORE_DATA to
    libxl__restore_emulator_xenstore_data without checking its emulator id."""
    data = bytearray(make_image([0]))
    record = data.index(b"physmap/") - 16
    data[record + 8 : record + 12] = struct.pack("<I", 0x99)  # no such emulator
    index = read_image(io.BytesIO(bytes(data)))
    assert index.xenstore is not None and index.xenstore.emulator_id == 0x99
    assert dict(index.xenstore.pairs)["physmap/1f00000/name"] == "vga.vram"


def test_savefile_header_rules() -> None:
    good = make_image([0])
    hdr_flags = 32 + 4
    data = bytearray(good)
    data[hdr_flags : hdr_flags + 4] = struct.pack("<I", 1)  # JSON but no STREAMv2
    with pytest.raises(StreamError, match="legacy"):
        read_image(io.BytesIO(bytes(data)))
    data[hdr_flags : hdr_flags + 4] = struct.pack("<I", 0x13)
    with pytest.raises(StreamError, match="unknown mandatory flags"):
        read_image(io.BytesIO(bytes(data)))
    data = bytearray(good)
    data[32:36] = struct.pack(">I", 0x01020304)
    with pytest.raises(StreamError, match="byte order"):
        read_image(io.BytesIO(bytes(data)))
    assert good.startswith(savefile.MAGIC)
    # xl_saverestore.c refuses unknown mandatory flags only: optional ones are ignored.
    data = bytearray(good)
    data[hdr_flags + 4 : hdr_flags + 8] = struct.pack("<I", 0x80)
    assert read_image(io.BytesIO(bytes(data))).xenstore is not None


def test_images_pass_xens_own_verify_stream_v2(tmp_path: Path) -> None:
    """Differential check against Xen's verifier (xen-utils-4.17, unpacked by `make setup`).

    Its Python 3 port mis-compares bytes with str on EMULATOR_XENSTORE_DATA, so the image
    checked here is the new-mode kind, without that record.
    """
    tool = XEN_ROOT / "bin" / "verify-stream-v2"
    assert tool.exists(), f"{tool} is missing: run `make setup`"
    image = tmp_path / "vm.img"
    image.write_bytes(make_image([*range(40), 0xF0000, 0xF0001], pairs=[], batch=16))
    env = dict(os.environ, PYTHONPATH=str(XEN_ROOT / "lib" / "python"))
    proc = subprocess.run(
        [sys.executable, str(tool), "--format", "xl", "--in", str(image), "--verbose"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Libxl Record: Emulator context" in proc.stdout
    assert "Libxc Image Header: Version 3" in proc.stdout
    corrupt = bytearray(image.read_bytes())
    corrupt[-8] = 0x66
    image.write_bytes(bytes(corrupt))
    bad = subprocess.run(
        [sys.executable, str(tool), "--format", "xl", "--in", str(image)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode != 0

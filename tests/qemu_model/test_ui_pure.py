"""The screen's pure parts: surfaces and image files, the RFB codec, dirty tiles, -vnc syntax."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qemu_model.ui import console, rfb
from qemu_model.ui.console import Surface
from qemu_model.ui.dirty import TILE, FrameDiff
from qemu_model.ui.vnc_display import VncAddress, VncConfigError, parse_vnc
from toolstack.config import DomainConfig
from toolstack.devicemodel import vnc_arg


def surface(w: int, h: int, data: bytes) -> Surface:
    return Surface(w, h, data)


# ------------------------------------------------------------------------------ console


def test_ppm_and_png_carry_the_same_rgb() -> None:
    data = bytes(range(256)) * 3  # 192 pixels of B, G, R, X
    s = surface(16, 12, data)
    rgb = b"".join(bytes((data[i + 2], data[i + 1], data[i])) for i in range(0, len(data), 4))
    assert console.ppm_save(s) == b"P6\n16 12\n255\n" + rgb
    with Image.open(io.BytesIO(console.png_save(s))) as img:
        assert (img.mode, img.size) == ("RGB", (16, 12))
        assert img.tobytes() == rgb


def test_guest_surface_reads_rows_through_the_stride() -> None:
    memory = {0x1000: bytes(range(24))}  # 2 rows of 2 pixels at 24 bpp, stride 12
    mode = {"width": 2, "height": 2, "bpp": 24, "stride": 12}
    s = console.guest_surface(mode, (0x1000, 24), lambda p, n: memory[p][:n])
    assert (s.width, s.height, s.placeholder) == (2, 2, False)
    assert s.data == bytes((0, 1, 2, 0, 3, 4, 5, 0, 12, 13, 14, 0, 15, 16, 17, 0))


def test_no_mode_or_no_framebuffer_is_the_placeholder() -> None:
    def never(p: int, n: int) -> bytes:
        raise AssertionError("read without a mode")

    mode = {"width": 8, "height": 8, "bpp": 32, "stride": 32}
    for m, fb in ((None, (0, 256)), (mode, None), ({**mode, "stride": 4}, (0, 256))):
        s = console.guest_surface(m, fb, never)
        assert (s.width, s.height, s.placeholder) == (640, 480, True)
        assert s.data == bytes(640 * 480 * 4)


@given(st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0))
def test_15_and_16_bit_pixels_widen_like_qemus_vga(packed: bytes) -> None:
    for bpp in (15, 16):
        got = console.to_xrgb(packed, bpp)
        for i, (v,) in enumerate(struct.iter_unpack("<H", packed)):
            if bpp == 16:
                r, g, b = (v >> 11) << 3, ((v >> 5) & 0x3F) << 2, (v & 0x1F) << 3
            else:
                r, g, b = ((v >> 10) & 0x1F) << 3, ((v >> 5) & 0x1F) << 3, (v & 0x1F) << 3
            assert got[4 * i : 4 * i + 4] == bytes((b, g, r, 0))


def test_qxl_16_bit_format_16_is_555() -> None:
    mode = {"width": 1, "height": 1, "bpp": 16, "stride": 2, "format": 16}
    s = console.guest_surface(mode, (0, 2), lambda p, n: struct.pack("<H", 0x7C00))
    assert s.data == bytes((0, 0, 0xF8, 0))  # pure red in 5:5:5


# ------------------------------------------------------------------------------ RFB codec


def handshake(version: bytes = b"RFB 003.008\n") -> tuple[rfb.RfbServer, bytes]:
    srv = rfb.RfbServer("test")
    out = srv.data_to_send()
    srv.receive_data(version)
    assert srv.next_event() is None
    out += srv.data_to_send()
    return srv, out


def test_handshake_38_offers_none_and_reports_success() -> None:
    srv, out = handshake()
    assert out == b"RFB 003.008\n" + bytes((1, 1))
    srv.receive_data(b"\x01")
    assert srv.next_event() is None
    assert srv.data_to_send() == struct.pack(">I", 0)
    srv.receive_data(b"\x01")
    assert srv.next_event() == rfb.ClientInit(shared=True)
    srv.server_init(320, 200)
    init = srv.data_to_send()
    assert init[:4] == struct.pack(">HH", 320, 200)
    fmt = rfb.PixelFormat.unpack(init[4:20])
    assert fmt == rfb.SERVER_FORMAT and (fmt.bits_per_pixel, fmt.red_shift) == (32, 16)
    assert init[20:] == struct.pack(">I", 4) + b"test"


def test_handshake_33_and_37() -> None:
    srv, out = handshake(b"RFB 003.003\n")
    assert out.endswith(struct.pack(">I", 1))
    srv.receive_data(b"\x00")
    assert srv.next_event() == rfb.ClientInit(shared=False)
    srv, out = handshake(b"RFB 003.007\n")
    srv.receive_data(b"\x01\x00")
    assert srv.next_event() == rfb.ClientInit(shared=False)
    assert srv.data_to_send() == b""  # no SecurityResult for None in 3.7


@pytest.mark.parametrize("version", [b"RFB 004.000\n", b"HTTP/1.1 200", b"RFB 003.00x\n"])
def test_bad_versions_are_refused(version: bytes) -> None:
    srv = rfb.RfbServer("t")
    srv.receive_data(version)
    with pytest.raises(rfb.RfbError):
        srv.next_event()


def test_other_security_types_fail_with_a_reason() -> None:
    srv, _ = handshake()
    srv.receive_data(b"\x02")
    with pytest.raises(rfb.RfbError, match="only None"):
        srv.next_event()
    assert srv.data_to_send() == struct.pack(">II", 1, 21) + b"Authentication failed"


def normal() -> rfb.RfbServer:
    srv, _ = handshake()
    srv.receive_data(b"\x01\x01")
    assert isinstance(srv.next_event(), rfb.ClientInit)
    srv.server_init(64, 32)
    srv.data_to_send()
    return srv


RGB565 = rfb.PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
MESSAGES = [
    (
        bytes(4) + RGB565.pack(),
        rfb.SetPixelFormat(RGB565),
    ),
    (struct.pack(">BxHii", 2, 2, 0, -223), rfb.SetEncodings((0, -223))),
    (
        struct.pack(">BBHHHH", 3, 1, 1, 2, 3, 4),
        rfb.FramebufferUpdateRequest(True, rfb.Rect(1, 2, 3, 4)),
    ),
    (struct.pack(">BBxxI", 4, 1, 0xFF0D), rfb.KeyEvent(True, 0xFF0D)),
    (struct.pack(">BBHH", 5, 3, 10, 20), rfb.PointerEvent(3, 10, 20)),
    (struct.pack(">BxxxI", 6, 2) + b"hi", rfb.ClientCutText(b"hi")),
]


@settings(max_examples=200)
@given(
    order=st.permutations(range(len(MESSAGES))),
    cuts=st.lists(st.integers(1, 40), max_size=20),
)
def test_messages_decode_however_the_bytes_are_split(order: list[int], cuts: list[int]) -> None:
    srv = normal()
    wire = b"".join(MESSAGES[i][0] for i in order)
    got: list[rfb.Event] = []
    pos = 0
    for n in [*cuts, len(wire)]:
        srv.receive_data(wire[pos : pos + n])
        pos += n
        while (ev := srv.next_event()) is not None:
            got.append(ev)
    assert got == [MESSAGES[i][1] for i in order]
    assert srv.format == RGB565 and srv.desktop_size


@pytest.mark.parametrize(
    ("fmt", "why"),
    [
        (rfb.PixelFormat(24, 24), "bits-per-pixel 24"),
        (rfb.PixelFormat(8, 8, true_colour=False), "colour-map"),
        (rfb.PixelFormat(16, 16, red_max=255, red_shift=11), "bad red"),
        (rfb.PixelFormat(32, 24, green_max=100), "bad green"),
    ],
)
def test_unsupported_pixel_formats_close_with_a_reason(fmt: rfb.PixelFormat, why: str) -> None:
    srv = normal()
    srv.receive_data(bytes(4) + fmt.pack())
    with pytest.raises(rfb.RfbError, match=why):
        srv.next_event()


def test_unknown_message_and_oversized_lengths_are_errors() -> None:
    for wire in (b"\x07", struct.pack(">BxH", 2, 5000), struct.pack(">BxxxI", 6, 1 << 30)):
        srv = normal()
        srv.receive_data(wire)
        with pytest.raises(rfb.RfbError):
            srv.next_event()


def reference_pixel(b: int, g: int, r: int, fmt: rfb.PixelFormat) -> bytes:
    def top(c: int, mx: int) -> int:
        bits = mx.bit_length()
        return c >> (8 - bits) if bits <= 8 else c << (bits - 8)

    v = (
        top(r, fmt.red_max) << fmt.red_shift
        | top(g, fmt.green_max) << fmt.green_shift
        | top(b, fmt.blue_max) << fmt.blue_shift
    )
    return v.to_bytes(fmt.bits_per_pixel // 8, "big" if fmt.big_endian else "little")


@st.composite
def pixel_formats(draw: st.DrawFn) -> rfb.PixelFormat:
    bpp = draw(st.sampled_from([8, 16, 32]))
    bits = [draw(st.integers(1, min(10, bpp // 3 + 2))) for _ in range(3)]
    if sum(bits) > bpp:
        bits = [1, 1, 1]
    perm = draw(st.permutations([0, 1, 2]))
    shifts, at = [0, 0, 0], 0
    for ch in perm:
        shifts[ch] = at
        at += bits[ch]
    return rfb.PixelFormat(
        bpp, min(sum(bits), bpp), draw(st.booleans()), True,
        (1 << bits[0]) - 1, (1 << bits[1]) - 1, (1 << bits[2]) - 1, *shifts,
    )  # fmt: skip


@given(fmt=pixel_formats() | st.just(rfb.PixelFormat(32, 24, True, True, 255, 255, 255, 0, 8, 16)),
       data=st.binary(min_size=4, max_size=64).map(lambda b: b[: len(b) // 4 * 4]))  # fmt: skip
def test_conversion_matches_per_pixel_reference(fmt: rfb.PixelFormat, data: bytes) -> None:
    assert fmt.problem() is None
    want = b"".join(reference_pixel(*data[i : i + 3], fmt) for i in range(0, len(data), 4))
    assert rfb.convert(data, fmt) == want


def test_update_is_clipped_and_resize_announced() -> None:
    srv = normal()  # client framebuffer 64x32
    s = surface(100, 40, bytes(range(256)) * (100 * 40 * 4 // 256) + bytes(100 * 40 * 4 % 256))
    msg = srv.framebuffer_update(s, [rfb.Rect(60, 30, 10, 10), rfb.Rect(70, 0, 5, 5)])
    assert msg[:4] == struct.pack(">BxH", 0, 1)
    assert struct.unpack(">HHHHi", msg[4:16]) == (60, 30, 4, 2, 0)
    assert msg[16:] == rfb.crop(s, rfb.Rect(60, 30, 4, 2)) and len(msg[16:]) == 4 * 2 * 4
    resize = srv.desktop_resize(100, 40)
    assert resize == struct.pack(">BxHHHHHi", 0, 1, 0, 0, 100, 40, -223)
    assert (srv.width, srv.height) == (100, 40)


# ------------------------------------------------------------------------------ dirty tiles


@settings(max_examples=100)
@given(
    w=st.integers(1, 50),
    h=st.integers(1, 40),
    changes=st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), max_size=8),
)
def test_dirty_rects_cover_every_change_and_only_dirty_tiles(
    w: int, h: int, changes: list[tuple[int, int]]
) -> None:
    old = bytearray(w * h * 4)
    new = bytearray(old)
    for pos, value in changes:
        new[pos % len(new)] = value
    rects = FrameDiff().dirty_rects(surface(w, h, bytes(old)), surface(w, h, bytes(new)))
    patched = bytearray(old)
    for r in rects:
        assert r.x % TILE == 0 and r.y % TILE == 0 and r.x + r.w <= w and r.y + r.h <= h
        for y in range(r.y, r.y + r.h):
            row = slice((y * w + r.x) * 4, (y * w + r.x + r.w) * 4)
            patched[row] = new[row]
    assert patched == new
    if old == new:
        assert rects == []
    assert len(rects) <= ((w + TILE - 1) // TILE) * ((h + TILE - 1) // TILE)


def test_no_previous_frame_or_new_size_is_everything() -> None:
    s = surface(20, 10, bytes(800))
    assert FrameDiff().dirty_rects(None, s) == [rfb.Rect(0, 0, 20, 10)]
    assert FrameDiff().dirty_rects(surface(10, 20, bytes(800)), s) == [rfb.Rect(0, 0, 20, 10)]


# ------------------------------------------------------------------------------ -vnc syntax


@pytest.mark.parametrize(
    ("arg", "want"),
    [
        ("127.0.0.1:3", VncAddress("127.0.0.1", 3)),
        (":0", VncAddress(None, 0)),
        ("[::1]:2,to=99", VncAddress("::1", 2, 99)),
        ("unix:/run/v.sock", VncAddress(unix="/run/v.sock")),
        ("none", None),
    ],
)
def test_parse_vnc(arg: str, want: VncAddress | None) -> None:
    assert parse_vnc(arg) == want
    if want is not None:
        assert parse_vnc(str(want)) == want


@pytest.mark.parametrize(
    "arg", ["127.0.0.1", "host:x", ":60000", ":5,to=2", ":1,password", "unix:", ":-1"]
)
def test_parse_vnc_refuses(arg: str) -> None:
    with pytest.raises(VncConfigError, match="vnc: "):
        parse_vnc(arg)


@pytest.mark.parametrize(
    ("cfg", "want"),
    [
        ({}, None),
        ({"vnc": True}, "127.0.0.1:0,to=99"),
        ({"vnc": True, "vncdisplay": 4, "vncunused": False}, "127.0.0.1:4"),
        ({"vnc": True, "vnclisten": "0.0.0.0", "vncdisplay": 4}, "0.0.0.0:4,to=99"),
        # A display in both: vncdisplay wins and the listen address falls back to loopback.
        ({"vnc": True, "vnclisten": "10.0.0.1:7", "vncdisplay": 4}, "127.0.0.1:4,to=99"),
        ({"vnc": True, "vnclisten": "10.0.0.1:7"}, "10.0.0.1:7,to=99"),
        ({"vnc": True, "vnclisten": "10.0.0.1"}, "10.0.0.1:0,to=99"),
        ({"vnc": True, "vnclisten": "unix:/r/v.sock"}, "unix:/r/v.sock"),
    ],
)
def test_vnc_arg_is_built_as_libxl_builds_it(cfg: dict[str, object], want: str | None) -> None:
    got = vnc_arg(DomainConfig(**cfg))  # type: ignore[arg-type]
    assert got == want
    if got is not None:
        assert parse_vnc(got) is not None


def test_qemu_model_refuses_a_bad_vnc_argument_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from qemu_model.cli import parse_args

    run = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--domid", "1", "--rundir", run, "--vnc", "5901"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qemu-model: error: vnc: '5901' is not HOST:DISPLAY")
    cfg = parse_args(["--domid", "1", "--rundir", run, "--vnc", "unix:/tmp/x/v.sock"])
    assert cfg.vnc == VncAddress(unix="/tmp/x/v.sock")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("vncdisplay = 70000", "vncdisplay must be an integer from 0 to"),
        ("vnclisten = 'a,b'", "vnclisten 'a,b' must be an address"),
        ("vnclisten = ''", "vnclisten '' must be an address"),
        ("vnc = 2", "vnc must be 0 or 1"),
        ("vncdisplay = '3'", "vncdisplay must be an integer"),
    ],
)
def test_bad_vnc_settings_name_the_key(text: str, why: str) -> None:
    from toolstack.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=why):
        parse_config(text, "guest.cfg")

"""The guest's screen, seen from outside: QMP ``screendump`` and the VNC server.

The stack is real (xenstored-sim, hypervisor-sim, ``xl-sim``, ``qemu-model``); the VNC
client is vncdotool's ``vncdo`` command, a program of its own.  The expected pixels are
computed here from the guest driver's pattern, not from qemu_model's conversion code.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from hypervisor_sim import guest_drivers
from physmap_lab.stack import Stack
from toolstack.qmp import QmpError, open_qmp
from xenhost import RunDir

VNCDO = str(Path(sys.executable).parent / "vncdo")
W, H = 320, 200


def expected_rgb(device: str, seed: int, bpp: int) -> bytes:
    """What the guest drew, as 8-bit RGB: 32 bpp is B, G, R, X; 16 bpp is 5:6:5 with each
    channel at the top of its byte (QEMU's vga_draw_line16)."""
    _, length = guest_drivers.framebuffer(device, guest_drivers.DEFAULT_BAR_ADDR, W, H, bpp)
    raw = guest_drivers.pattern_bytes(seed, length)
    out = bytearray()
    if bpp == 32:
        for i in range(0, W * H * 4, 4):
            out += bytes((raw[i + 2], raw[i + 1], raw[i]))
    else:
        for (v,) in struct.iter_unpack("<H", raw[: W * H * 2]):
            out += bytes(((v >> 8) & 0xF8, (v >> 3) & 0xFC, (v << 3) & 0xF8))
    return bytes(out)


async def boot(xl: Any, tmp: Path, device: str, bpp: int, seed: int, **cfg: str) -> int:
    lines = [f"vga = '{device}'", "memory = 32", *(f"{k} = {v}" for k, v in cfg.items())]
    path = tmp / f"{device}.cfg"
    path.write_text("\n".join(lines) + "\n")
    domid = int((await xl("create", str(path)))["domid"])
    mode = ["--width", str(W), "--height", str(H), "--bpp", str(bpp)]
    await xl("guest", str(domid), "map-bar")
    await xl("guest", str(domid), "set-mode", *mode, *_vram(device))
    await xl("guest", str(domid), "draw", "--seed", str(seed), *mode)
    return domid


def _vram(device: str) -> list[str]:
    # QXL's RAM header sits at the end of its VRAM: the driver must know the size (64 MiB
    # of the default 128 MiB of video memory).
    return ["--vram-mib", "64"] if device == "qxl" else []


async def vncdo_capture(server: str, out: Path) -> None:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [VNCDO, "--server", server, "capture", str(out)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def free_display() -> int:
    """A display whose TCP port is free now, found by binding it."""
    for display in range(50 + os.getpid() % 400, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
            return display
    raise RuntimeError("no free VNC display")


@pytest.mark.parametrize("device", ["stdvga", "qxl"])
async def test_vncdo_captures_exactly_what_the_guest_drew(
    stack: Stack, xl: Any, tmp_path: Path, device: str
) -> None:
    sock = tmp_path / "vnc.sock"
    domid = await boot(xl, tmp_path, device, 32, 11, vnc="1", vnclisten=f"'unix:{sock}'")
    shot = tmp_path / "vnc.png"
    await vncdo_capture(str(sock), shot)
    with Image.open(shot) as img:
        assert img.size == (W, H)
        got = img.convert("RGB").tobytes()
    assert got == expected_rgb(device, 11, 32)
    await xl("destroy", str(domid))
    assert not sock.exists()


async def test_vnc_on_tcp_display_from_xl_cfg(stack: Stack, xl: Any, tmp_path: Path) -> None:
    display = free_display()
    domid = await boot(
        xl, tmp_path, "stdvga", 32, 5, vnc="1", vncdisplay=str(display), vncunused="0"
    )
    async with open_qmp(RunDir(stack.rundir).qmp_socket(domid)) as q:
        info = await q.execute("query-vnc")
    assert info["enabled"] and info["service"] == str(5900 + display)
    assert (info["host"], info["family"], info["auth"]) == ("127.0.0.1", "ipv4", "none")
    shot = tmp_path / "tcp.png"
    await vncdo_capture(f"127.0.0.1::{5900 + display}", shot)
    with Image.open(shot) as img:
        assert img.convert("RGB").tobytes() == expected_rgb("stdvga", 5, 32)
    await xl("destroy", str(domid))


@pytest.mark.parametrize(("device", "bpp"), [("stdvga", 32), ("cirrus", 16), ("qxl", 32)])
async def test_screendump_matches_the_framebuffer(
    stack: Stack, xl: Any, tmp_path: Path, device: str, bpp: int
) -> None:
    domid = await boot(xl, tmp_path, device, bpp, 3)
    want = expected_rgb(device, 3, bpp)
    ppm, png = tmp_path / "shot.ppm", tmp_path / "shot.png"
    async with open_qmp(RunDir(stack.rundir).qmp_socket(domid)) as q:
        assert await q.execute("screendump", {"filename": str(ppm)}) == {}
        assert await q.execute("screendump", {"filename": str(png), "format": "png"}) == {}
    assert ppm.read_bytes() == f"P6\n{W} {H}\n255\n".encode() + want
    with Image.open(io.BytesIO(png.read_bytes())) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (W, H))
        assert img.tobytes() == want
    await xl("destroy", str(domid))


async def test_screendump_errors_are_qemus(stack: Stack, xl: Any, tmp_path: Path) -> None:
    domid = int((await xl("create", "--memory", "32"))["domid"])
    async with open_qmp(RunDir(stack.rundir).qmp_socket(domid)) as q:

        async def error(**args: Any) -> str:
            with pytest.raises(QmpError) as info:
                await q.execute("screendump", args)
            return str(info.value)

        target = str(tmp_path / "x.ppm")
        assert "does not accept value 'jpeg'" in await error(filename=target, format="jpeg")
        assert "must be specified together with 'device'" in await error(filename=target, head=0)
        assert "Device 'nope' not found" in await error(filename=target, device="nope")
        assert "failed to open file" in await error(filename=str(tmp_path / "no/such/x.ppm"))
        assert "expected: integer" in await error(filename=target, device="stdvga", head="0")
        assert not Path(target).exists()
        # No mode set yet: QEMU's 640x480 placeholder.
        assert (
            await q.execute("screendump", {"filename": target, "device": "stdvga", "head": 0}) == {}
        )
    assert Path(target).read_bytes() == b"P6\n640 480\n255\n" + bytes(640 * 480 * 3)
    await xl("destroy", str(domid))


class RawRfb:
    """A bare RFB 3.8 client, to drive the server where vncdo cannot (resize, formats)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.bpp = 4
        self.size = (0, 0)
        self.fb = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def handshake(self) -> None:
        assert await self.read(12) == b"RFB 003.008\n"
        await self.stream.send_all(b"RFB 003.008\n")
        assert await self.read(2) == b"\x01\x01"
        await self.stream.send_all(b"\x01")
        assert await self.read(4) == bytes(4)
        await self.stream.send_all(b"\x01")
        w, h = struct.unpack(">HH", await self.read(4))
        await self.read(16)
        (n,) = struct.unpack(">I", await self.read(4))
        await self.read(n)
        self.resize(w, h)
        await self.stream.send_all(struct.pack(">BxHii", 2, 2, 0, -223))

    def resize(self, w: int, h: int) -> None:
        self.size = (w, h)
        self.fb = bytearray(w * h * self.bpp)

    async def update(self, incremental: bool) -> list[tuple[int, int, int, int, int]]:
        w, h = self.size
        await self.stream.send_all(struct.pack(">BBHHHH", 3, incremental, 0, 0, w, h))
        with trio.fail_after(20):
            kind, n = struct.unpack(">BxH", await self.read(4))
            assert kind == 0
            rects = []
            for _ in range(n):
                x, y, rw, rh, enc = struct.unpack(">HHHHi", await self.read(12))
                rects.append((x, y, rw, rh, enc))
                if enc == -223:
                    self.resize(rw, rh)
                    continue
                assert enc == 0
                data = await self.read(rw * rh * self.bpp)
                line = rw * self.bpp
                for row in range(rh):
                    at = ((y + row) * self.size[0] + x) * self.bpp
                    self.fb[at : at + line] = data[row * line : (row + 1) * line]
        return rects

    def rgb565_to_rgb(self) -> bytes:
        return b"".join(
            bytes(((v >> 11) << 3, ((v >> 5) & 0x3F) << 2, (v & 0x1F) << 3))
            for (v,) in struct.iter_unpack("<H", self.fb)
        )

    def xrgb_to_rgb(self) -> bytes:
        fb = self.fb
        return b"".join(bytes((fb[i + 2], fb[i + 1], fb[i])) for i in range(0, len(fb), 4))


async def test_vnc_resizes_on_mode_set_and_sends_what_changed(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    sock = tmp_path / "v.sock"
    cfg = tmp_path / "g.cfg"
    cfg.write_text(f"memory = 32\nvnc = 1\nvnclisten = 'unix:{sock}'\n")
    domid = int((await xl("create", str(cfg)))["domid"])
    g = ["guest", str(domid)]
    mode = ["--width", str(W), "--height", str(H), "--bpp", "32"]
    async with await trio.open_unix_socket(str(sock)) as stream:
        a = RawRfb(stream)
        await a.handshake()
        assert a.size == (640, 480)  # the placeholder until the guest sets a mode
        assert await a.update(False) == [(0, 0, 640, 480, 0)]
        await xl(*g, "map-bar")
        await xl(*g, "set-mode", *mode)
        assert await a.update(True) == [(0, 0, W, H, -223)] and a.size == (W, H)
        assert await a.update(True) == [(0, 0, W, H, 0)]  # after a resize: everything
        await xl(*g, "draw", "--seed", "9", *mode)
        rects = await a.update(True)
        assert all(enc == 0 for *_, enc in rects)
        assert a.xrgb_to_rgb() == expected_rgb("stdvga", 9, 32)
        # A client asking for a format the server does not do is closed; others carry on.
        async with await trio.open_unix_socket(str(sock)) as bad_stream:
            bad = RawRfb(bad_stream)
            await bad.handshake()
            await bad_stream.send_all(
                bytes(4) + struct.pack(">BBBBHHHBBB3x", 24, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            )
            with pytest.raises((EOFError, trio.BrokenResourceError)), trio.fail_after(10):
                await bad.update(False)
        rng = random.Random(15)
        for _ in range(5):  # garbage before or after the handshake
            async with await trio.open_unix_socket(str(sock)) as junk:
                if rng.random() < 0.5:
                    await RawRfb(junk).handshake()
                with contextlib.suppress(trio.BrokenResourceError):
                    await junk.send_all(rng.randbytes(rng.randrange(1, 4096)))
        # Input is accepted and dropped; RGB565 is converted as QEMU converts it.
        await stream.send_all(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 0, 1, 1))
        fmt = struct.pack(">BBBBHHHBBB3x", 16, 16, 0, 1, 31, 63, 31, 11, 5, 0)
        await stream.send_all(bytes(4) + fmt)
        a.bpp = 2
        a.resize(W, H)
        assert await a.update(False) == [(0, 0, W, H, 0)]
        assert a.rgb565_to_rgb() == bytes(
            b & m
            for b, m in zip(expected_rgb("stdvga", 9, 32), [0xF8, 0xFC, 0xF8] * W * H, strict=True)
        )
    await xl("destroy", str(domid))

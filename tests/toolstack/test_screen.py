"""The guest's screen, seen from outside: QMP ``screendump`` and the VNC server.

The stack is real (xenstored-sim, hypervisor-sim, ``xl-sim``, ``qemu-model``); the VNC
client is vncdotool's ``vncdo`` command, a program of its own.  The expected pixels are
computed here from the guest driver's pattern, not from qemu_model's conversion code.
"""

from __future__ import annotations

import io
import os
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
    async with open_qmp(stack.rundir / "qmp" / f"{domid}.sock") as q:
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
    async with open_qmp(stack.rundir / "qmp" / f"{domid}.sock") as q:
        assert await q.execute("screendump", {"filename": str(ppm)}) == {}
        assert await q.execute("screendump", {"filename": str(png), "format": "png"}) == {}
    assert ppm.read_bytes() == f"P6\n{W} {H}\n255\n".encode() + want
    with Image.open(io.BytesIO(png.read_bytes())) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (W, H))
        assert img.tobytes() == want
    await xl("destroy", str(domid))


async def test_screendump_errors_are_qemus(stack: Stack, xl: Any, tmp_path: Path) -> None:
    domid = int((await xl("create", "--memory", "32"))["domid"])
    async with open_qmp(stack.rundir / "qmp" / f"{domid}.sock") as q:

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
        assert await q.execute(
            "screendump", {"filename": target, "device": "stdvga", "head": 0}
        ) == {}
    assert Path(target).read_bytes() == b"P6\n640 480\n255\n" + bytes(640 * 480 * 3)
    await xl("destroy", str(domid))

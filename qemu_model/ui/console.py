"""The console surface and the image files of QMP ``screendump`` (sans-IO).

A display device publishes a *surface*: what its scan-out shows, read through the device's
own pointers (cf. QEMU hw/display/vga.c ``vga_update_display`` reading ``vram_ptr``,
hw/display/qxl-render.c reading the primary surface through its memslot pointer).  A device
whose pointers went stale therefore shows the wrong picture here, as it would in QEMU.

Surfaces are 32-bit ``x8r8g8b8`` in host (little-endian) byte order, one row after another:
QEMU's default pixman format for display surfaces (include/ui/console.h,
``PIXMAN_x8r8g8b8``).  Guest formats are converted on the way in, as QEMU's VGA
``vga_draw_line*`` helpers do.  With no mode set QEMU shows a 640x480 placeholder surface
(ui/console.c ``qemu_create_placeholder_surface``); here it is plain black.

:func:`ppm_save` and :func:`png_save` write what QEMU's ``ppm_save``/``png_save`` write: a
binary ``P6`` 8-bit RGB image, or an 8-bit RGB PNG without interlace.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from hypervisor_sim import vma

from ..qmp import QmpError

PLACEHOLDER_WIDTH: Final = 640
PLACEHOLDER_HEIGHT: Final = 480
#: SPICE_SURFACE_FMT_16_555: the one QXL format whose 16 bits are 5:5:5 (spice/enums.h).
SPICE_SURFACE_FMT_16_555: Final = 16

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Surface:
    """A ``DisplaySurface``: ``width`` x ``height`` pixels of ``x8r8g8b8``."""

    width: int
    height: int
    data: bytes
    #: No mode is set: this is the placeholder, not the guest's picture.
    placeholder: bool = False

    @property
    def stride(self) -> int:
        return self.width * 4

    def rgb(self) -> bytes:
        """The pixels as packed 8-bit R, G, B (what PPM and PNG carry)."""
        n = self.width * self.height
        out = bytearray(n * 3)
        src = self.data
        # x8r8g8b8 little-endian is B, G, R, X in memory.
        out[0::3] = src[2::4]
        out[1::3] = src[1::4]
        out[2::3] = src[0::4]
        return bytes(out)


class Display(Protocol):
    """What a display device shows: its mode and its scan-out through its own pointers."""

    def mode_info(self) -> dict[str, Any] | None: ...

    def framebuffer(self) -> tuple[int, int] | None: ...


def device_surface(device: Display) -> Surface:
    """``qemu_console_surface`` after a display update: call under the device model's lock."""
    return guest_surface(device.mode_info(), device.framebuffer(), vma.read)


def placeholder() -> Surface:
    data = bytes(PLACEHOLDER_WIDTH * PLACEHOLDER_HEIGHT * 4)
    return Surface(PLACEHOLDER_WIDTH, PLACEHOLDER_HEIGHT, data, placeholder=True)


def guest_surface(
    mode: Mapping[str, Any] | None, fb: tuple[int, int] | None, read: Reader
) -> Surface:
    """The surface of a device whose ``mode_info()`` is ``mode`` and whose ``framebuffer()``
    (host pointer, length) is ``fb``; ``read(ptr, length)`` reads host memory."""
    if mode is None or fb is None:
        return placeholder()
    width, height, bpp, stride = mode["width"], mode["height"], mode["bpp"], mode["stride"]
    if bpp == 16 and mode.get("format") == SPICE_SURFACE_FMT_16_555:
        bpp = 15
    bytes_pp = (bpp + 7) // 8
    ptr, length = fb
    if width <= 0 or height <= 0 or stride < width * bytes_pp or length < stride * height:
        return placeholder()
    raw = read(ptr, stride * height)
    line = width * bytes_pp
    packed = (
        raw
        if stride == line
        else b"".join(raw[y * stride : y * stride + line] for y in range(height))
    )
    return Surface(width, height, to_xrgb(packed, bpp))


def to_xrgb(packed: bytes, bpp: int) -> bytes:
    """Packed guest pixels of ``bpp`` bits to ``x8r8g8b8`` (cf. QEMU hw/display/vga-helpers.h)."""
    if bpp == 32:
        return packed
    if bpp == 24:  # B, G, R in memory
        n = len(packed) // 3
        out = bytearray(n * 4)
        out[0::4] = packed[0::3]
        out[1::4] = packed[1::3]
        out[2::4] = packed[2::3]
        return bytes(out)
    if bpp in (15, 16):
        return _repack16(packed, bpp)
    if bpp == 8:
        # The DAC palette is not modelled: an index shows as that level of grey.
        return b"".join(bytes((v, v, v, 0)) for v in packed)
    raise ValueError(f"unsupported depth {bpp}")


def _repack16(packed: bytes, bpp: int) -> bytes:
    """15/16-bit little-endian pixels to ``x8r8g8b8``: each channel's bits at the top of its
    byte, the low bits zero (QEMU hw/display/vga-helpers.h ``vga_draw_line15/16``).

    Every output byte is a shift-and-mask of the pixel, so it is the OR of one 256-entry
    translation of each input byte: no per-pixel Python."""
    channels: tuple[Callable[[int], int], ...]
    if bpp == 16:
        channels = (
            lambda v: (v << 3) & 0xF8,
            lambda v: (v >> 3) & 0xFC,
            lambda v: (v >> 8) & 0xF8,
        )
    else:
        channels = (
            lambda v: (v << 3) & 0xF8,
            lambda v: (v >> 2) & 0xF8,
            lambda v: (v >> 7) & 0xF8,
        )
    n = len(packed) // 2
    inputs = (packed[0 : 2 * n : 2], packed[1 : 2 * n : 2])
    out = bytearray(n * 4)
    for k, channel in enumerate(channels):  # B, G, R
        acc = 0
        for j, data in enumerate(inputs):
            table = bytes(channel(x << (8 * j)) for x in range(256))
            acc |= int.from_bytes(data.translate(table), "little")
        out[k::4] = acc.to_bytes(n, "little")
    return bytes(out)


# ------------------------------------------------------------------------------ image files


def ppm_save(surface: Surface) -> bytes:
    """QEMU ui/console.c ``ppm_save``: ``P6``, width height, 255, then RGB rows."""
    header = f"P6\n{surface.width} {surface.height}\n255\n".encode()
    return header + surface.rgb()


def png_save(surface: Surface) -> bytes:
    """QEMU ui/console.c ``png_save``: 8-bit RGB, no interlace, default compression."""
    rgb = surface.rgb()
    row = surface.width * 3
    raw = b"".join(b"\0" + rgb[y * row : (y + 1) * row] for y in range(surface.height))
    ihdr = struct.pack(">IIBBBBB", surface.width, surface.height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", zlib.compress(raw, 6)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


#: ``ImageFormat`` of QEMU qapi/ui.json -> writer.
IMAGE_FORMATS: Final[dict[str, Callable[[Surface], bytes]]] = {"ppm": ppm_save, "png": png_save}


def screendump_format(args: Mapping[str, Any], device_id: str) -> str:
    """Check ``screendump``'s optional arguments as QEMU does (ui/ui-qmp-cmds.c
    ``qmp_screendump``, qapi/ui.json); returns the image format.  The one console is the VGA
    device's head 0, and the device answers to its model name."""
    fmt = args.get("format", "ppm")
    if fmt not in IMAGE_FORMATS:
        raise QmpError(f"Parameter 'format' does not accept value '{fmt}'")
    device, head = args.get("device"), args.get("head")
    if device is None:
        if head is not None:
            raise QmpError("'head' must be specified together with 'device'")
        return str(fmt)
    if device != device_id:
        raise QmpError(f"Device '{device}' not found", "DeviceNotFound")
    if head not in (None, 0):
        raise QmpError(f"Device '{device}' (head {head}) is not a graphic console")
    return str(fmt)

"""The top-left corner of a QMP ``screendump`` (PPM), kept as a small PNG for the report.

Pure.  The PPM is what QEMU ui/console.c ``ppm_save`` writes (``P6``, width height, 255, RGB
rows); the PNG is 8-bit RGB as the PNG specification's minimal file (IHDR, IDAT, IEND).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

#: The corner kept: enough of the seeded pattern to tell two screens apart.
CROP: Final = (120, 90)


def ppm_corner(ppm: bytes, width: int, height: int) -> tuple[int, int, bytes]:
    """The top-left ``width`` x ``height`` RGB pixels of a ``P6`` image (clipped to it)."""
    fields = ppm.split(maxsplit=4)
    if len(fields) < 5 or fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError("not a P6 PPM with maxval 255")
    w, h = int(fields[1]), int(fields[2])
    pixels = fields[4]
    cw, ch = min(width, w), min(height, h)
    rows = [pixels[y * w * 3 : y * w * 3 + cw * 3] for y in range(ch)]
    return cw, ch, b"".join(rows)


def png(width: int, height: int, rgb: bytes) -> bytes:
    raw = b"".join(b"\0" + rgb[y * width * 3 : (y + 1) * width * 3] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def corner_png(ppm: bytes) -> bytes:
    return png(*ppm_corner(ppm, *CROP))

"""Where the screen changed: the dirty region source of the VNC server (sans-IO).

QEMU's VNC server learns what changed from the display device, which learns it from the
memory API's dirty log of the VRAM (hw/display/vga.c ``vga_draw_graphic`` asks
``memory_region_snapshot_and_clear_dirty``; under Xen the log comes from the hypervisor's
``track_dirty_vram``, hw/i386/xen/xen-hvm.c ``xen_sync_dirty_bitmap``).  It keeps a dirty
bitmap per client at a granularity of 16 pixels (ui/vnc.c ``VNC_DIRTY_PIXELS_PER_BIT``).

The VNC server asks a :class:`DirtyRegionSource` for the rectangles that changed since the
frame it last sent a client.  :class:`FrameDiff` answers by comparing the two frames tile by
tile; a source fed by the VRAM dirty bitmap answers from the bitmap instead and can take its
place without touching the server.
"""

from __future__ import annotations

from typing import Final, Protocol

from .console import Surface
from .rfb import Rect

#: Tile edge in pixels (cf. ui/vnc.c ``VNC_DIRTY_PIXELS_PER_BIT``).
TILE: Final = 16


class DirtyRegionSource(Protocol):
    def dirty_rects(self, previous: Surface | None, current: Surface) -> list[Rect]:
        """What differs in ``current`` from ``previous`` (the frame a client has); everything
        when there is no previous frame or its size differs."""
        ...


def whole(surface: Surface) -> list[Rect]:
    return [Rect(0, 0, surface.width, surface.height)]


class FrameDiff:
    """Dirty tiles found by comparing the frame with the last one sent; runs of dirty tiles
    in a band of rows become one rectangle."""

    def dirty_rects(self, previous: Surface | None, current: Surface) -> list[Rect]:
        if previous is None or previous.width != current.width or previous.height != current.height:
            return whole(current)
        if previous.data == current.data:
            return []
        rects: list[Rect] = []
        stride = current.stride
        old, new = previous.data, current.data
        for y0 in range(0, current.height, TILE):
            h = min(TILE, current.height - y0)
            band = slice(y0 * stride, (y0 + h) * stride)
            if old[band] == new[band]:
                continue
            run_start: int | None = None
            for x0 in range(0, current.width + TILE, TILE):
                dirty = x0 < current.width and _tile_differs(old, new, stride, x0, y0, h)
                if dirty and run_start is None:
                    run_start = x0
                elif not dirty and run_start is not None:
                    end = min(x0, current.width)
                    rects.append(Rect(run_start, y0, end - run_start, h))
                    run_start = None
        return rects


def _tile_differs(old: bytes, new: bytes, stride: int, x0: int, y0: int, h: int) -> bool:
    left, right = x0 * 4, min(x0 + TILE, stride // 4) * 4
    for y in range(y0, y0 + h):
        row = y * stride
        if old[row + left : row + right] != new[row + left : row + right]:
            return True
    return False

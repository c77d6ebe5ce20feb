"""The screen: what a VNC update and a screendump cost, as ratios taken in one run.

An 800x600 guest screen of random pixels (the demo's mode) goes through the device model's
own code (:mod:`qemu_model.ui`): a full raw update against an incremental one after the guest
changed one 16x16 tile (bytes on the wire, and time including the dirty-tile scan), the scan of
an unchanged frame against a full update, a PNG screendump against a PPM one, and an update in a
client's RGB565 against one in the server's own format.  A full update in the server's format
is a copy of the frame, so the time ratios mostly show what the scan and conversions add.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qemu_model.ui import console, rfb
from qemu_model.ui.console import Surface
from qemu_model.ui.dirty import FrameDiff

from .results import Results, Target, ratio


@dataclass(frozen=True)
class Sizes:
    width: int
    height: int
    repeats: int


FULL = Sizes(800, 600, 7)
QUICK = Sizes(160, 120, 2)


def _time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _client(w: int, h: int) -> rfb.RfbServer:
    codec = rfb.RfbServer("bench")
    codec.server_init(w, h)
    codec.data_to_send()
    return codec


def measure(results: Results, sz: Sizes) -> dict[str, Any]:
    rng = random.Random(1)
    w, h = sz.width, sz.height
    frame = Surface(w, h, rng.randbytes(w * h * 4))
    changed = bytearray(frame.data)
    for y in range(16):  # one 16x16 tile in the middle changes
        at = ((h // 2 + y) * w + w // 2) * 4
        changed[at : at + 64] = rng.randbytes(64)
    after = Surface(w, h, bytes(changed))
    codec, diff = _client(w, h), FrameDiff()
    full = codec.framebuffer_update(frame, [rfb.Rect(0, 0, w, h)])
    incremental = codec.framebuffer_update(after, diff.dirty_rects(frame, after))
    t_full = _time(lambda: codec.framebuffer_update(frame, [rfb.Rect(0, 0, w, h)]), sz.repeats)
    t_inc = _time(
        lambda: codec.framebuffer_update(after, diff.dirty_rects(frame, after)), sz.repeats
    )
    same = Surface(w, h, bytes(frame.data))  # equal, not the same object
    t_scan = _time(lambda: diff.dirty_rects(frame, same), sz.repeats)
    t_png = _time(lambda: console.png_save(frame), sz.repeats)
    t_ppm = _time(lambda: console.ppm_save(frame), sz.repeats)
    t_565 = _time(
        lambda: rfb.convert(frame.data, rfb.PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)),
        sz.repeats,
    )
    shape = f"{w}x{h} x 32 bpp, median of {sz.repeats}"
    rows = [
        ("incremental update bytes / full update bytes, one 16x16 tile changed",
         ratio(len(incremental), len(full)), "≤ 0.01x", 0.01,
         f"{len(incremental):,} vs {len(full):,} bytes; {shape}"),
        ("incremental update time (scan + encode) / full update time (encode)",
         ratio(t_inc, t_full), "reported", None,
         f"{t_inc * 1e3:.2f} vs {t_full * 1e3:.2f} ms; {shape}"),
        ("scan of an unchanged frame / full update time",
         ratio(t_scan, t_full), "≤ 1x", 1.0,
         f"{t_scan * 1e3:.3f} vs {t_full * 1e3:.2f} ms; {shape}"),
        ("screendump PNG / PPM encode time", ratio(t_png, t_ppm), "reported", None,
         f"{t_png * 1e3:.1f} vs {t_ppm * 1e3:.1f} ms; {shape}"),
        ("full update in RGB565 / in the server's format", ratio(t_565, t_full), "reported", None,
         f"{t_565 * 1e3:.1f} vs {t_full * 1e3:.2f} ms (byte-wise translation); {shape}"),
    ]  # fmt: skip
    for name, figure, goal, bound, note in rows:
        results.add(Target("screen", name, figure, "x", goal, bound, at_least=False, note=note))
    return {
        "sizes": sz.__dict__,
        "bytes": {"full": len(full), "incremental": len(incremental)},
        "seconds": {
            "full": t_full, "incremental": t_inc, "scan_unchanged": t_scan,
            "png": t_png, "ppm": t_ppm, "full_rgb565": t_565,
        },
    }  # fmt: skip

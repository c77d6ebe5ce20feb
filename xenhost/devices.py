"""The registry of the guest's display devices: the one list of them every process reads.

docs/architecture.md, "Guest-visible hardware".  Each entry gives what is fixed about the
device as the guest and the toolstack see it; each program keeps its own behaviour for a
device in a table keyed by these names (the device model's classes in
``qemu_model.machine.DEVICES``, the guest's drivers in ``hypervisor_sim.guest_drivers``), and
``tests/test_device_registry.py`` checks that those tables and this one agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class DisplayDevice:
    """One display device at PCI 00:02.0."""

    name: str
    #: PCI vendor and device id (QEMU hw/display/vga-pci.c, cirrus_vga.c, qxl.c).
    vendor_id: int
    device_id: int
    #: libxl's default ``videoram`` in MiB (libxl_create.c,
    #: libxl__domain_build_info_setdefault).
    videoram_default_mib: int
    #: What each BAR shows, BAR 0 first: only ``vga.vram`` is ever relocated in the p2m.
    bars: tuple[str, ...]


DISPLAY_DEVICES: Final[Mapping[str, DisplayDevice]] = {
    d.name: d
    for d in (
        DisplayDevice("stdvga", 0x1234, 0x1111, 16, ("vga.vram: the linear framebuffer",)),
        DisplayDevice(
            "cirrus", 0x1013, 0x00B8, 8, ("32 MiB window, vga.vram at 0 in linear mode",)
        ),
        DisplayDevice(
            "qxl",
            0x1B36,
            0x0100,
            128,
            ("vga.vram: QXL RAM, header at its end", "qxl.vram", "ROM", "I/O ports"),
        ),
    )
}

#: The device names, in the order the demo and the audit go through them.
DEVICE_NAMES: Final[tuple[str, ...]] = tuple(DISPLAY_DEVICES)

#: xl.cfg's default ``vga`` for this project (QEMU's default VGA).
DEFAULT_DEVICE: Final = "stdvga"

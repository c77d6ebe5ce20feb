"""The guest's video drivers: pure functions from a driver action to generic guest ops.

docs/architecture.md, "The scriptable guest" and "Guest-visible hardware": the VGA device is
PCI 00:02.0 (``sbdf`` 0x10); BAR 0 shows ``vga.vram``.  Each driver turns an action into the
port, config-space and memory accesses a real driver would make:

* ``map_bar`` (``addr``): disable decoding, program BAR 0 (QXL: also the I/O BAR 3), enable
  decoding.  Enabling memory decoding is what makes the device model move the VRAM to ``addr``.
* ``set_mode`` (``width``, ``height``, ``bpp``; QXL also ``addr`` and ``vram_mib``): Bochs VBE
  for stdvga (ports 0x1ce/0x1cf); SR07 linear mode plus the CRTC geometry for cirrus
  (0x3c4/0x3c5, 0x3d4/0x3d5); for QXL a memslot over BAR 0 and a primary surface at its start,
  written into the RAM header at the end of the VRAM and committed through the I/O BAR.
* ``draw`` (``seed`` and the mode fields): fill the visible framebuffer with
  :func:`pattern_bytes`; ``sha256`` (the mode fields): hash it as the guest reads it.

:func:`framebuffer` gives the guest-physical range of the visible framebuffer.  In every mode
programmed here it starts at the BAR and is ``width * height * bytes_per_pixel`` long.

Nothing here imports trio or does I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any, Final

DEVICES: Final = ("stdvga", "cirrus", "qxl")
ACTIONS: Final = ("map_bar", "set_mode", "draw", "sha256")

VGA_SBDF: Final = 0x10
PCI_COMMAND: Final = 0x04
PCI_COMMAND_IO: Final = 0x1
PCI_COMMAND_MEMORY: Final = 0x2
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_BASE_ADDRESS_3: Final = 0x1C

#: Where the drivers put things unless told otherwise.
DEFAULT_BAR_ADDR: Final = 0xF0000000
DEFAULT_VRAM_MIB: Final = 16
QXL_IO_BASE: Final = 0xC000

# Bochs VBE (QEMU stdvga).
VBE_INDEX: Final = 0x1CE
VBE_DATA: Final = 0x1CF
VBE_XRES, VBE_YRES, VBE_BPP, VBE_ENABLE = 1, 2, 3, 4
VBE_ENABLED: Final = 0x01
VBE_LFB_ENABLED: Final = 0x40
VBE_BPPS: Final = (8, 15, 16, 24, 32)

# Cirrus sequencer and CRTC.
SEQ_INDEX, SEQ_DATA = 0x3C4, 0x3C5
CRT_INDEX, CRT_DATA = 0x3D4, 0x3D5
CIRRUS_SR7: Final = {8: 0x01, 16: 0x07, 24: 0x05, 32: 0x09}  # linear SVGA mode | bpp code

# QXL: RAM header at the end of BAR 0 (layout in qemu_model/qxl.py), I/O port numbers.
# ALIGN(sizeof(QXLRam), 4096): QXLRam is 5348 bytes (spice-protocol qxl_dev.h), with mem_slot
# and create_surface after the 4 KiB log buffer and the three rings.
QXL_RAM_HEADER_SIZE: Final = 8192
QXL_HDR_MEM_SLOT: Final = 5276
QXL_HDR_CREATE_SURFACE: Final = 5292
QXL_IO_MEMSLOT_ADD: Final = 8
QXL_IO_CREATE_PRIMARY: Final = 12
QXL_FORMATS: Final = {32: 32, 16: 80}  # bpp -> SPICE_SURFACE_FMT_32_xRGB / _16_565


def pattern_bytes(seed: int, n: int) -> bytes:
    """``n`` deterministic bytes for ``seed``: every process draws and checks the same ones."""
    if n < 0:
        raise ValueError("length must not be negative")
    return hashlib.shake_256(f"physmap-lab pattern {seed}".encode()).digest(n)


def framebuffer(device: str, bar_addr: int, width: int, height: int, bpp: int) -> tuple[int, int]:
    """The guest-physical ``(gpa, length)`` of the visible framebuffer."""
    _check_device(device)
    _check_mode(device, width, height, bpp)
    return bar_addr, width * height * _bytes_pp(bpp)


def ops_for(device: str, action: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The generic guest ops of one driver action (raises ValueError on bad input)."""
    _check_device(device)
    addr = _int(params, "addr", DEFAULT_BAR_ADDR)
    if addr <= 0 or addr & 0xFFFFF or addr >= 1 << 32:
        raise ValueError("addr must be a 1 MiB aligned 32-bit address")
    if action == "map_bar":
        return _map_bar(device, addr)
    if action in ("set_mode", "draw", "sha256"):
        width, height, bpp = _int(params, "width"), _int(params, "height"), _int(params, "bpp")
        _check_mode(device, width, height, bpp)
        if action == "set_mode":
            if device == "stdvga":
                return _vbe_mode(width, height, bpp)
            if device == "cirrus":
                return _cirrus_mode(width, height, bpp)
            return _qxl_primary(
                addr, _int(params, "vram_mib", DEFAULT_VRAM_MIB), width, height, bpp
            )
        gpa, length = framebuffer(device, addr, width, height, bpp)
        if action == "draw":
            return [{"op": "mem_fill", "gpa": gpa, "len": length, "seed": _int(params, "seed")}]
        return [{"op": "mem_sha256", "gpa": gpa, "len": length}]
    if action == "framebuffer":
        raise ValueError("framebuffer is not a guest op list: call guest_drivers.framebuffer()")
    raise ValueError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")


#: The name hypervisor-sim's ``guest_driver`` call uses.
driver_ops = ops_for


# --------------------------------------------------------------------------------------------


def _cfg(reg: int, size: int, value: int) -> dict[str, Any]:
    return {"op": "pci_cfg_write", "sbdf": VGA_SBDF, "reg": reg, "size": size, "value": value}


def _pio(port: int, size: int, value: int) -> dict[str, Any]:
    return {"op": "pio_write", "port": port, "size": size, "value": value}


def _map_bar(device: str, addr: int) -> list[dict[str, Any]]:
    ops = [_cfg(PCI_COMMAND, 2, 0), _cfg(PCI_BASE_ADDRESS_0, 4, addr)]
    command = PCI_COMMAND_MEMORY
    if device == "qxl":
        ops.append(_cfg(PCI_BASE_ADDRESS_3, 4, QXL_IO_BASE | 1))
        command |= PCI_COMMAND_IO
    ops.append(_cfg(PCI_COMMAND, 2, command))
    return ops


def _vbe_mode(width: int, height: int, bpp: int) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for index, value in (
        (VBE_ENABLE, 0),
        (VBE_XRES, width),
        (VBE_YRES, height),
        (VBE_BPP, bpp),
        (VBE_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED),
    ):
        ops += [_pio(VBE_INDEX, 2, index), _pio(VBE_DATA, 2, value)]
    return ops


def _cirrus_mode(width: int, height: int, bpp: int) -> list[dict[str, Any]]:
    pitch = width * _bytes_pp(bpp) // 8  # in units of 8 bytes
    vde = height - 1
    crtc = {
        0x01: width // 8 - 1,
        0x12: vde & 0xFF,
        0x07: ((vde >> 8) & 1) << 1 | ((vde >> 9) & 1) << 6,
        0x13: pitch & 0xFF,
        0x1B: ((pitch >> 8) & 1) << 4,
    }
    ops = [_pio(SEQ_INDEX, 1, 0x06), _pio(SEQ_DATA, 1, 0x12)]  # unlock the extensions
    for reg, value in crtc.items():
        ops += [_pio(CRT_INDEX, 1, reg), _pio(CRT_DATA, 1, value)]
    # Linear mode last: the VRAM appears in BAR 0 when SR07 selects it.
    ops += [_pio(SEQ_INDEX, 1, 0x07), _pio(SEQ_DATA, 1, CIRRUS_SR7[bpp])]
    return ops


def _qxl_primary(
    addr: int, vram_mib: int, width: int, height: int, bpp: int
) -> list[dict[str, Any]]:
    if not 1 <= vram_mib <= 256:
        raise ValueError("vram_mib must be 1..256")
    vram = vram_mib << 20
    header = addr + vram - QXL_RAM_HEADER_SIZE
    stride = width * _bytes_pp(bpp)
    if stride * height > vram - QXL_RAM_HEADER_SIZE:
        raise ValueError("the primary surface does not fit in the VRAM")
    slot = struct.pack("<QQ", addr, addr + vram)
    # QXLPHYSICAL: slot 0 in bits 63:56, the offset inside the slot below (the surface starts
    # the slot, which starts BAR 0).
    surface = struct.pack("<IIiIIIIIQ", width, height, stride, QXL_FORMATS[bpp], 0, 0, 0, 0, 0)
    return [
        {"op": "mem_write", "gpa": header + QXL_HDR_MEM_SLOT, "data": slot},
        _pio(QXL_IO_BASE + QXL_IO_MEMSLOT_ADD, 1, 0),
        {"op": "mem_write", "gpa": header + QXL_HDR_CREATE_SURFACE, "data": surface},
        _pio(QXL_IO_BASE + QXL_IO_CREATE_PRIMARY, 1, 0),
    ]


def _bytes_pp(bpp: int) -> int:
    return (bpp + 7) // 8


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")


def _check_mode(device: str, width: int, height: int, bpp: int) -> None:
    if not (1 <= width <= 4096 and 1 <= height <= 4096):
        raise ValueError("width and height must be 1..4096")
    allowed = {"stdvga": VBE_BPPS, "cirrus": tuple(CIRRUS_SR7), "qxl": tuple(QXL_FORMATS)}[device]
    if bpp not in allowed:
        raise ValueError(f"{device} does not do {bpp} bpp (allowed: {allowed})")
    if device == "cirrus" and (width % 8 or width > 2048 or height > 1024):
        raise ValueError("cirrus modes need a width that is a multiple of 8, at most 2048x1024")


def _int(params: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = params.get(name, default)
    if value is None:
        raise ValueError(f"missing parameter {name!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be an integer")
    return value

"""Cirrus CLGD 5446 (1013:00b8), reduced to what moves the VRAM.

BAR 0 is a 32 MiB window; ``vga.vram`` appears at its offset 0 while the linear VRAM mapping
is on.  ``cirrus_update_memory_access`` (hw/display/cirrus_vga.c) turns it off only for the
blitter and bank modes (SR17, GR0B, GR05 with GR0B bit 2) and on otherwise, text mode
included: SR07 bit 0 only gates the legacy bank aliases, which are not modelled.
``cirrus_reset`` turns it off.  It is re-evaluated on writes to SR07, SR17, GR05 and GR0B and by
``cirrus_post_load``: on restore the VRAM enters the address space (the listener's
``region_add``) only when post_load runs.

The display geometry comes from the CRTC (0x3d4/0x3d5): CR01 horizontal display end,
CR12/CR07 vertical display end, CR13/CR1B the line offset, as ``cirrus_get_resolution`` and
``cirrus_get_offsets`` read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .pci import PCIBar
from .vga import Framebuffer, MachineOps, VGAPCIDevice

CIRRUS_BAR0_SIZE: Final = 32 << 20
VGA_SEQ_INDEX: Final = 0x3C4
VGA_SEQ_DATA: Final = 0x3C5
VGA_GFX_INDEX: Final = 0x3CE
VGA_GFX_DATA: Final = 0x3CF
VGA_CRT_INDEX: Final = 0x3D4
VGA_CRT_DATA: Final = 0x3D5
CIRRUS_SR7_BPP_SVGA: Final = 0x01
CIRRUS_SR7_BPP_MASK: Final = 0x0E
#: SR07 bits 3:1 -> bits per pixel (CIRRUS_SR7_BPP_8/16_DOUBLEVCLK/24/16/32).
CIRRUS_SR7_BPPS: Final = {0x00: 8, 0x02: 16, 0x04: 24, 0x06: 16, 0x08: 32}
CIRRUS_ID_CLGD5446: Final = 0x2E << 2  # CR27 chip id of the CLGD5446


class Cirrus(VGAPCIDevice):
    kind = "cirrus"
    VENDOR_ID = 0x1013
    DEVICE_ID = 0x00B8

    def __init__(self, machine: MachineOps, vram_size: int) -> None:
        super().__init__(machine, vram_size)
        self.register_bar(0, CIRRUS_BAR0_SIZE, io=False, prefetch=True)
        self.sr = bytearray(256)
        self.gr = bytearray(256)
        self.cr = bytearray(256)
        self.sr_index = self.gr_index = self.cr_index = 0
        self.sr[0x06] = 0x0F  # extensions unlocked, as the BIOS leaves them
        self.cr[0x27] = CIRRUS_ID_CLGD5446
        self.linear_vram = False  # vga.vram is a subregion of BAR 0
        self.linear_at: int | None = None  # where vga.vram is in the address space
        #: ``cirrus_srcptr != cirrus_srcptr_end``: the blitter is not modelled, so never.
        self.blit_in_progress = False
        self.cirrus_reset()

    def cirrus_reset(self) -> None:
        """``cirrus_reset``: the linear VRAM mapping is removed (``unmap_linear_vram``)."""
        self.linear_vram = False
        self._apply_linear()

    # ----------------------------------------------------------------------------------------
    # Memory access

    def linear_vram_mode(self) -> bool:
        """The condition of ``cirrus_update_memory_access`` for ``map_linear_vram``."""
        sr, gr = self.sr, self.gr
        if (sr[0x17] & 0x44) == 0x44 or self.blit_in_progress:
            return False
        if (gr[0x0B] & 0x14) == 0x14 or gr[0x0B] & 0x02:
            return False
        mode = gr[0x05] & 0x07
        return mode < 4 or mode > 5 or not gr[0x0B] & 0x04

    def update_memory_access(self) -> None:
        """``cirrus_update_memory_access``: map or unmap the linear VRAM in BAR 0."""
        self.linear_vram = self.linear_vram_mode()
        self._apply_linear()

    def _apply_linear(self) -> None:
        """The memory listener's view: the VRAM is in the address space where BAR 0 decodes,
        while it is a subregion of BAR 0."""
        bar = self.bar0_addr()
        want = bar if bar is not None and self.linear_vram else None
        if want == self.linear_at:
            return
        if self.linear_at is not None:
            self.machine.region_del(self.vga.vram, self.linear_at, self.vga.vram_size)
        self.linear_at = want
        if want is not None:
            self.machine.region_add(self.vga.vram, want, self.vga.vram_size)

    def bar_moved(self, bar: PCIBar, old: int | None, new: int | None) -> None:
        if bar.index == 0:
            self._apply_linear()

    # ----------------------------------------------------------------------------------------
    # Ports

    def pio_read(self, port: int, size: int) -> int | None:
        regs = self._regs(port)
        if regs is None:
            return None
        index_port, array, index = regs
        if port == index_port:
            value = index
            if size == 2:
                value |= array[index] << 8
            return value
        return array[index]

    def pio_write(self, port: int, size: int, value: int) -> bool:
        regs = self._regs(port)
        if regs is None:
            return False
        index_port = regs[0]
        if port == index_port:
            self._set_index(port, value & 0xFF)
            if size == 2:  # outw: index and data in one access
                self._write_reg(port, (value >> 8) & 0xFF)
            return True
        self._write_reg(index_port, value & 0xFF)
        return True

    def _regs(self, port: int) -> tuple[int, bytearray, int] | None:
        if port in (VGA_SEQ_INDEX, VGA_SEQ_DATA):
            return VGA_SEQ_INDEX, self.sr, self.sr_index
        if port in (VGA_GFX_INDEX, VGA_GFX_DATA):
            return VGA_GFX_INDEX, self.gr, self.gr_index
        if port in (VGA_CRT_INDEX, VGA_CRT_DATA):
            return VGA_CRT_INDEX, self.cr, self.cr_index
        return None

    def _set_index(self, index_port: int, index: int) -> None:
        if index_port == VGA_SEQ_INDEX:
            self.sr_index = index
        elif index_port == VGA_GFX_INDEX:
            self.gr_index = index
        else:
            self.cr_index = index

    def _write_reg(self, index_port: int, value: int) -> None:
        if index_port == VGA_SEQ_INDEX:
            if self.sr_index == 0x17:  # cirrus_vga_write_sr: bits 3-5 are read-only
                value = (self.sr[0x17] & 0x38) | (value & 0xC7)
            self.sr[self.sr_index] = value
            if self.sr_index in (0x07, 0x17):
                self.update_memory_access()
        elif index_port == VGA_GFX_INDEX:
            self.gr[self.gr_index] = value & 0x7F if self.gr_index == 0x05 else value
            if self.gr_index in (0x05, 0x0B):
                self.update_memory_access()
        elif self.cr_index != 0x27:  # the chip id is read-only
            self.cr[self.cr_index] = value

    # ----------------------------------------------------------------------------------------
    # Display

    def mode_info(self) -> dict[str, Any] | None:
        if not self.sr[0x07] & CIRRUS_SR7_BPP_SVGA:
            return None
        bpp = CIRRUS_SR7_BPPS.get(self.sr[0x07] & CIRRUS_SR7_BPP_MASK)
        if bpp is None:
            return None
        cr = self.cr
        width = (cr[0x01] + 1) * 8
        height = (cr[0x12] | ((cr[0x07] & 0x02) << 7) | ((cr[0x07] & 0x40) << 3)) + 1
        stride = (cr[0x13] | ((cr[0x1B] & 0x10) << 4)) << 3
        return {"width": width, "height": height, "bpp": bpp, "stride": stride, "start": 0}

    def framebuffer(self) -> Framebuffer | None:
        mode = self.mode_info()
        ptr = self.vga.vram_ptr
        if mode is None or ptr is None:
            return None
        length = mode["height"] * mode["stride"]
        if length == 0 or length > self.vga.vram_size:
            return None
        return ptr, length

    # ----------------------------------------------------------------------------------------
    # vmstate

    def save_state(self) -> dict[str, Any]:
        return {
            "sr_index": self.sr_index,
            "gr_index": self.gr_index,
            "cr_index": self.cr_index,
            "sr": bytes(self.sr),
            "gr": bytes(self.gr),
            "cr": bytes(self.cr),
        }

    def check_state(self, state: Mapping[str, Any]) -> str | None:
        for name in ("sr", "gr", "cr"):
            value = state.get(name)
            if not isinstance(value, bytes) or len(value) != 256:
                return f"bad cirrus state: {name} must be 256 bytes"
        for name in ("sr_index", "gr_index", "cr_index"):
            value = state.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
                return f"bad cirrus state: {name} must be a byte"
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.sr[:] = state["sr"]
        self.gr[:] = state["gr"]
        self.cr[:] = state["cr"]
        self.sr_index, self.gr_index, self.cr_index = (
            state["sr_index"],
            state["gr_index"],
            state["cr_index"],
        )

    def post_load(self) -> None:
        """``cirrus_post_load``: re-apply the memory mapping (region_add happens here)."""
        self.update_memory_access()

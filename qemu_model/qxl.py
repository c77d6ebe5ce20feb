"""QXL (1b36:0100), reduced to its pointers into VRAM.

BAR 0 is ``vga.vram``, the QXL RAM, with the RAM header at its end; BAR 1 (``qxl.vram``) and
the ROM (BAR 2) are sized but not backed here; BAR 3 holds the I/O ports.  What matters is
how QXL derives pointers from the VRAM pointer (docs/qemu-physmap.md, 'VRAM and the devices'):

* ``init_qxl_ram`` at realize: ``ram = vga.vram_ptr + ram_header_offset``;
* ``qxl_add_memslot``: a slot's host ``virt_start`` comes from the block's host pointer
  (``memory_region_get_ram_ptr``) plus the slot's offset into the BAR;
* the primary surface's pointer is ``qxl_phys2virt`` of its QXLPHYSICAL address.

These are the pointers a scheme that patches only ``vga.vram_ptr`` leaves behind
(docs/qemu-physmap.md, 'Why not patch the pointers').

The RAM header layout (little-endian; offsets from the header start):

=====  ====  =============================================
0      u32   magic ``QXRA`` (0x41525851)
4      u32   int_pending
8      u32   int_mask
16     u64   mem_slot.mem_start   (guest-physical)
24     u64   mem_slot.mem_end
32     u32   create_surface.width
36     u32   create_surface.height
40     i32   create_surface.stride
44     u32   create_surface.format (SPICE_SURFACE_FMT_*)
48     u32   create_surface.position
52     u32   create_surface.mouse_mode
56     u32   create_surface.flags
60     u32   create_surface.type
64     u64   create_surface.mem    (QXLPHYSICAL: slot id in bits 63:56, guest address below)
=====  ====  =============================================
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from hypervisor_sim import vma

from .vga import Framebuffer, MachineOps, VGAPCIDevice

QXL_RAM_MAGIC: Final = 0x41525851
QXL_RAM_HEADER_SIZE: Final = 4096
QXL_VRAM_BAR_SIZE: Final = 4 << 20
QXL_ROM_SIZE: Final = 8 << 10
QXL_IO_RANGE_SIZE: Final = 32
QXL_IO_RESET: Final = 5
QXL_IO_MEMSLOT_ADD: Final = 8
QXL_IO_MEMSLOT_DEL: Final = 9
QXL_IO_CREATE_PRIMARY: Final = 12
QXL_IO_DESTROY_PRIMARY: Final = 13
NUM_MEMSLOTS: Final = 8
SLOT_ID_SHIFT: Final = 56
ADDR_MASK: Final = (1 << SLOT_ID_SHIFT) - 1
#: SPICE surface formats and their bytes per pixel.
SPICE_SURFACE_FMT: Final = {32: 4, 80: 2, 16: 2}

HDR_MEM_SLOT: Final = struct.Struct("<QQ")
HDR_MEM_SLOT_OFFSET: Final = 16
HDR_CREATE_SURFACE: Final = struct.Struct("<IIiIIIIIQ")
HDR_CREATE_SURFACE_OFFSET: Final = 32


@dataclass
class GuestSlot:
    active: bool = False
    mem_start: int = 0
    mem_end: int = 0
    virt_start: int | None = None  # host address handed to SPICE


@dataclass
class Primary:
    width: int
    height: int
    stride: int
    format: int
    mem: int


class QXL(VGAPCIDevice):
    kind = "qxl"
    VENDOR_ID = 0x1B36
    DEVICE_ID = 0x0100
    REVISION = 4

    def __init__(self, machine: MachineOps, vram_size: int) -> None:
        super().__init__(machine, vram_size)
        self.register_bar(0, vram_size, io=False)
        self.register_bar(1, QXL_VRAM_BAR_SIZE, io=False)
        self.register_bar(2, QXL_ROM_SIZE, io=False)
        self.register_bar(3, QXL_IO_RANGE_SIZE, io=True)
        self.ram_header_offset = vram_size - QXL_RAM_HEADER_SIZE
        self.guest_slots = [GuestSlot() for _ in range(NUM_MEMSLOTS)]
        self.primary: Primary | None = None
        self.surface_ptr: int | None = None
        self.last_io_error: str | None = None
        self.ram: int | None = None
        self._pending: Mapping[str, Any] | None = None
        self.init_qxl_ram()

    # ----------------------------------------------------------------------------------------
    # Pointers

    def init_qxl_ram(self) -> None:
        """``init_qxl_ram``: the header pointer, derived from ``vga.vram_ptr`` once."""
        ptr = self.vga.vram_ptr
        self.ram = None if ptr is None else ptr + self.ram_header_offset
        if self.ram is not None:
            vma.write(self.ram, struct.pack("<III", QXL_RAM_MAGIC, 0, 0))

    def add_memslot(self, slot_id: int, mem_start: int, mem_end: int) -> str | None:
        """``qxl_add_memslot``: the slot must lie in BAR 0; None on success, else why not."""
        if not 0 <= slot_id < NUM_MEMSLOTS:
            return f"bad memslot id {slot_id}"
        bar = self.bar0_addr()
        if bar is None or not bar <= mem_start <= mem_end <= bar + self.vga.vram_size:
            return f"memslot {slot_id} [{mem_start:#x}, {mem_end:#x}) is not in BAR 0"
        host = self.machine.get_ram_ptr(self.vga.vram)  # memory_region_get_ram_ptr
        if host is None:
            return "vga.vram has no host mapping"
        self.guest_slots[slot_id] = GuestSlot(True, mem_start, mem_end, host + (mem_start - bar))
        return None

    def phys2virt(self, pqxl: int, length: int) -> int | None:
        """``qxl_phys2virt``: a QXLPHYSICAL inside an active slot to a host pointer."""
        slot_id, addr = pqxl >> SLOT_ID_SHIFT, pqxl & ADDR_MASK
        if slot_id >= NUM_MEMSLOTS:
            return None
        slot = self.guest_slots[slot_id]
        if not slot.active or slot.virt_start is None:
            return None
        if not slot.mem_start <= addr <= addr + length <= slot.mem_end:
            return None
        return slot.virt_start + (addr - slot.mem_start)

    def create_primary(self, primary: Primary) -> str | None:
        bytes_pp = SPICE_SURFACE_FMT.get(primary.format)
        if bytes_pp is None or primary.width <= 0 or primary.height <= 0:
            return "unsupported primary surface"
        if primary.stride < primary.width * bytes_pp:
            return "primary surface stride too small"
        ptr = self.phys2virt(primary.mem, primary.stride * primary.height)
        if ptr is None:
            return "primary surface is not inside an active memslot"
        self.primary = primary
        self.surface_ptr = ptr
        return None

    # ----------------------------------------------------------------------------------------
    # I/O BAR

    def pio_read(self, port: int, size: int) -> int | None:
        base = self._io_base()
        if base is None or not base <= port < base + QXL_IO_RANGE_SIZE:
            return None
        return 0

    def pio_write(self, port: int, size: int, value: int) -> bool:
        base = self._io_base()
        if base is None or not base <= port < base + QXL_IO_RANGE_SIZE:
            return False
        self.last_io_error = self._io(port - base, value)
        return True

    def _io_base(self) -> int | None:
        bar = self.bars[3]
        return bar.addr if bar is not None else None

    def _io(self, io: int, value: int) -> str | None:
        if io == QXL_IO_RESET:
            self.guest_slots = [GuestSlot() for _ in range(NUM_MEMSLOTS)]
            self.primary = self.surface_ptr = None
            return None
        if io == QXL_IO_MEMSLOT_ADD:
            if self.ram is None:
                return "no RAM header"
            # The slot comes from the RAM header, read through the derived ``ram`` pointer.
            mem_start, mem_end = HDR_MEM_SLOT.unpack(
                vma.read(self.ram + HDR_MEM_SLOT_OFFSET, HDR_MEM_SLOT.size)
            )
            return self.add_memslot(value, mem_start, mem_end)
        if io == QXL_IO_MEMSLOT_DEL:
            if 0 <= value < NUM_MEMSLOTS:
                self.guest_slots[value] = GuestSlot()
            return None
        if io == QXL_IO_CREATE_PRIMARY:
            if self.ram is None:
                return "no RAM header"
            w, h, stride, fmt, _pos, _mouse, _flags, _type, mem = HDR_CREATE_SURFACE.unpack(
                vma.read(self.ram + HDR_CREATE_SURFACE_OFFSET, HDR_CREATE_SURFACE.size)
            )
            return self.create_primary(Primary(w, h, stride, fmt, mem))
        if io == QXL_IO_DESTROY_PRIMARY:
            self.primary = self.surface_ptr = None
            return None
        return None

    # ----------------------------------------------------------------------------------------
    # Display

    def mode_info(self) -> dict[str, Any] | None:
        p = self.primary
        if p is None:
            return None
        return {
            "width": p.width,
            "height": p.height,
            "bpp": SPICE_SURFACE_FMT[p.format] * 8,
            "stride": p.stride,
            "format": p.format,
        }

    def framebuffer(self) -> Framebuffer | None:
        """Through the memslot-derived surface pointer, as SPICE would read it."""
        if self.primary is None or self.surface_ptr is None:
            return None
        return self.surface_ptr, self.primary.stride * self.primary.height

    def derived_pointers(self) -> dict[str, tuple[int | None, int | None]]:
        ptr = self.vga.vram_ptr
        bar = self.bar0_addr()
        out: dict[str, tuple[int | None, int | None]] = {
            "ram": (self.ram, None if ptr is None else ptr + self.ram_header_offset)
        }
        for i, slot in enumerate(self.guest_slots):
            if slot.active:
                expected = None if ptr is None or bar is None else ptr + (slot.mem_start - bar)
                out[f"memslot{i}.virt_start"] = (slot.virt_start, expected)
        if self.primary is not None:
            addr = self.primary.mem & ADDR_MASK
            expected = None if ptr is None or bar is None else ptr + (addr - bar)
            out["primary_surface"] = (self.surface_ptr, expected)
        return out

    # ----------------------------------------------------------------------------------------
    # vmstate

    def save_state(self) -> dict[str, Any]:
        p = self.primary
        return {
            "ram_header_offset": self.ram_header_offset,
            "guest_slots": [
                {"active": s.active, "mem_start": s.mem_start, "mem_end": s.mem_end}
                for s in self.guest_slots
            ],
            "primary": None
            if p is None
            else {
                "width": p.width,
                "height": p.height,
                "stride": p.stride,
                "format": p.format,
                "mem": p.mem,
            },
        }

    def check_state(self, state: Mapping[str, Any]) -> str | None:
        if state.get("ram_header_offset") != self.ram_header_offset:
            return "bad qxl state: ram_header_offset does not match this device's VRAM size"
        slots = state.get("guest_slots")
        if not isinstance(slots, list) or len(slots) != NUM_MEMSLOTS:
            return f"bad qxl state: guest_slots must list {NUM_MEMSLOTS} slots"
        for s in slots:
            if not isinstance(s, dict) or not isinstance(s.get("active"), bool):
                return "bad qxl state: a guest slot is malformed"
            if not all(_uint(s.get(k)) for k in ("mem_start", "mem_end")):
                return "bad qxl state: a guest slot is malformed"
        p = state.get("primary")
        if p is not None and (
            not isinstance(p, dict)
            or not all(_uint(p.get(k)) for k in ("width", "height", "format", "mem"))
            or not isinstance(p.get("stride"), int)
        ):
            return "bad qxl state: primary surface is malformed"
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        self._pending = state

    def post_load(self) -> None:
        """``qxl_post_load``: re-add the memslots, then re-create the primary surface."""
        state, self._pending = self._pending, None
        if state is None:
            return
        self.guest_slots = [GuestSlot() for _ in range(NUM_MEMSLOTS)]
        for i, s in enumerate(state["guest_slots"]):
            if s["active"]:
                self.add_memslot(i, s["mem_start"], s["mem_end"])
        p = state["primary"]
        self.primary = self.surface_ptr = None
        if p is not None:
            self.create_primary(
                Primary(p["width"], p["height"], p["stride"], p["format"], p["mem"])
            )


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

"""QXL (1b36:0100), reduced to its pointers into VRAM (hw/display/qxl.c).

BAR 0 is ``vga.vram``, the QXL RAM, with the ``QXLRam`` header at its end; BAR 1 (``qxl.vram``)
and the ROM (BAR 2) are sized but not backed here; BAR 3 holds the I/O ports.  How QXL gets at
the VRAM:

* ``init_qxl_ram`` at realize: ``d->ram = vga.vram_ptr + ram_header_offset``, kept for the life
  of the device: the header, its rings and the interrupt registers are read through it;
* ``qxl_add_memslot``: a guest slot remembers ``{slot, mr, offset, size, delta, active}``, and
  the host range ``memory_region_get_ram_ptr(mr) + offset`` is registered with the SPICE server
  (``qemu_spice_add_memslot``: ``virt_start``, ``virt_end``, ``addr_delta``), which keeps it;
* ``qxl_phys2virt`` recomputes ``memory_region_get_ram_ptr(mr) + offset`` on every call;
* the SPICE server resolves the primary surface through its own memslot table.

So the pointers that go stale when the VRAM moves are ``d->ram``, ``d->last_release`` and the
SPICE memslots; ``qxl_phys2virt`` follows the RAM block.

``QXLRam`` (spice-protocol ``qxl_dev.h``, packed): magic, int_pending, int_mask, a 4 KiB
``log_buf``, the command, cursor and release rings, update_area, update_surface, mem_slot,
create_surface, flags, monitors_config: 5348 bytes, so the header takes
``ALIGN(sizeof(QXLRam), 4096)`` = 8 KiB at the end of BAR 0.  A QXLPHYSICAL holds the slot id
in bits 63:56 and the offset in the slot (minus the slot's ``delta``) below bit 48.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from hypervisor_sim import vma

from .memory import RamBlock
from .vga import Framebuffer, MachineOps, VGAPCIDevice

QXL_RAM_MAGIC: Final = 0x41525851
QXL_LOG_BUF_SIZE: Final = 4096
QXL_COMMAND_RING_SIZE: Final = 32
QXL_CURSOR_RING_SIZE: Final = 32
QXL_RELEASE_RING_SIZE: Final = 8
_RING_HEADER: Final = 20  # num_items, prod, notify_on_prod, cons, notify_on_cons
_QXL_COMMAND: Final = 16  # QXLPHYSICAL data, u32 type, u32 padding
QXL_RAM_CMD_RING: Final = 12 + QXL_LOG_BUF_SIZE
QXL_RAM_CURSOR_RING: Final = QXL_RAM_CMD_RING + _RING_HEADER + QXL_COMMAND_RING_SIZE * _QXL_COMMAND
QXL_RAM_RELEASE_RING: Final = (
    QXL_RAM_CURSOR_RING + _RING_HEADER + QXL_CURSOR_RING_SIZE * _QXL_COMMAND
)
QXL_RAM_UPDATE_AREA: Final = QXL_RAM_RELEASE_RING + _RING_HEADER + QXL_RELEASE_RING_SIZE * 8
HDR_MEM_SLOT_OFFSET: Final = QXL_RAM_UPDATE_AREA + 16 + 4  # after update_area, update_surface
HDR_CREATE_SURFACE_OFFSET: Final = HDR_MEM_SLOT_OFFSET + 16
SIZEOF_QXLRAM: Final = HDR_CREATE_SURFACE_OFFSET + 40 + 8 + 8  # + flags, monitors_config
QXL_RAM_HEADER_SIZE: Final = (SIZEOF_QXLRAM + 4095) // 4096 * 4096
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
ADDR_MASK: Final = 0xFFFFFFFFFFFF
#: SPICE surface formats and their bytes per pixel.
SPICE_SURFACE_FMT: Final = {32: 4, 80: 2, 16: 2}

HDR_MEM_SLOT: Final = struct.Struct("<QQ")
HDR_CREATE_SURFACE: Final = struct.Struct("<IIiIIIIIQ")


@dataclass
class GuestSlot:
    """``qxl->guest_slots[i]``: the guest's QXLMemSlot and where it lies in a RAM region."""

    mem_start: int = 0
    mem_end: int = 0
    mr: RamBlock | None = None
    offset: int = 0  # into the region
    size: int = 0
    delta: int = 0
    active: bool = False


@dataclass(frozen=True)
class SpiceMemSlot:
    """A ``QXLDevMemSlot`` as registered with the SPICE server: host addresses, kept."""

    virt_start: int
    virt_end: int
    addr_delta: int


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
        self.spice_memslots: dict[int, SpiceMemSlot] = {}
        self.primary: Primary | None = None
        self.last_io_error: str | None = None
        self.ram: int | None = None
        #: ``d->last_release``: a host pointer into a release ring item; command rings are not
        #: processed here, so it stays NULL, as after every reset.
        self.last_release: int | None = None
        self.native = False
        self._pending: Mapping[str, Any] | None = None
        self.init_qxl_ram()

    # ----------------------------------------------------------------------------------------
    # Pointers

    def _ram_ptr(self) -> int | None:
        """``memory_region_get_ram_ptr(&vga.vram)``: the RAM block's host pointer now."""
        return self.machine.get_ram_ptr(self.vga.vram)

    def init_qxl_ram(self) -> None:
        """``init_qxl_ram`` at realize: ``d->ram`` derived from ``vga.vram_ptr`` once."""
        ptr = self.vga.vram_ptr
        self.ram = None if ptr is None else ptr + self.ram_header_offset
        if self.ram is None:
            return
        vma.write(self.ram, struct.pack("<III", QXL_RAM_MAGIC, 0, 0))
        for ring, items in (
            (QXL_RAM_CMD_RING, QXL_COMMAND_RING_SIZE),
            (QXL_RAM_CURSOR_RING, QXL_CURSOR_RING_SIZE),
            (QXL_RAM_RELEASE_RING, QXL_RELEASE_RING_SIZE),
        ):
            vma.write(self.ram + ring, struct.pack("<I", items))  # SPICE_RING_INIT

    def add_memslot(self, slot_id: int, mem_start: int, mem_end: int, delta: int = 0) -> str | None:
        """``qxl_add_memslot``: None on success, else the guest bug."""
        if not 0 <= slot_id < NUM_MEMSLOTS:
            return f"bad memslot id {slot_id}"
        bar = self.bar0_addr()
        if bar is None or not bar <= mem_start <= mem_end <= bar + self.vga.vram_size:
            return f"memslot {slot_id} [{mem_start:#x}, {mem_end:#x}) is not in BAR 0"
        host = self._ram_ptr()
        if host is None:
            return "vga.vram has no host mapping"
        virt_start = host + (mem_start - bar)
        virt_end = host + (mem_end - bar)
        # qemu_spice_add_memslot: the SPICE server keeps these host addresses.
        self.spice_memslots[slot_id] = SpiceMemSlot(virt_start, virt_end, virt_start - delta)
        self.guest_slots[slot_id] = GuestSlot(
            mem_start, mem_end, self.vga.vram, virt_start - host, virt_end - virt_start, delta, True
        )
        return None

    def del_memslot(self, slot_id: int) -> None:
        """``qxl_del_memslot``."""
        self.spice_memslots.pop(slot_id, None)
        self.guest_slots[slot_id] = GuestSlot()

    def _slot_offset(self, pqxl: int) -> tuple[GuestSlot, int] | None:
        """``qxl_get_check_slot_offset``."""
        slot_id, offset = pqxl >> SLOT_ID_SHIFT, pqxl & ADDR_MASK
        if slot_id >= NUM_MEMSLOTS:
            return None
        slot = self.guest_slots[slot_id]
        if not slot.active or offset < slot.delta or offset - slot.delta > slot.size:
            return None
        return slot, offset - slot.delta

    def phys2virt(self, pqxl: int, length: int = 0) -> int | None:
        """``qxl_phys2virt`` (guest group): recomputed from the region's pointer on each call."""
        found = self._slot_offset(pqxl)
        if found is None:
            return None
        slot, offset = found
        if offset + length > slot.size or slot.mr is None:
            return None
        host = self.machine.get_ram_ptr(slot.mr)
        return None if host is None else host + slot.offset + offset

    def spice_virt(self, pqxl: int) -> int | None:
        """How the SPICE server reaches a QXLPHYSICAL: through the memslot it was given."""
        slot = self.spice_memslots.get(pqxl >> SLOT_ID_SHIFT)
        return None if slot is None else slot.addr_delta + (pqxl & ADDR_MASK)

    def create_primary(self, primary: Primary) -> str | None:
        """``qxl_create_guest_primary``: leave VGA mode (dirty logging off), go native."""
        bytes_pp = SPICE_SURFACE_FMT.get(primary.format)
        if bytes_pp is None or primary.width <= 0 or primary.height <= 0:
            return "unsupported primary surface"
        if primary.stride < primary.width * bytes_pp:
            return "primary surface stride too small"
        if self.phys2virt(primary.mem, primary.stride * primary.height) is None:
            return "primary surface is not inside an active memslot"
        self.exit_vga_mode()
        self.primary = primary
        self.native = True
        return None

    def enter_vga_mode(self) -> None:
        """``qxl_enter_vga_mode`` (reset): ``vga_dirty_log_start``."""
        self.native = False
        self.primary = None
        self.vga.dirty_log_start()

    def exit_vga_mode(self) -> None:
        """``qxl_exit_vga_mode``: ``vga_dirty_log_stop``."""
        self.vga.dirty_log_stop()

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
            for i in range(NUM_MEMSLOTS):
                self.del_memslot(i)
            self.last_release = None
            self.enter_vga_mode()
            return None
        if io == QXL_IO_MEMSLOT_DEL:
            if 0 <= value < NUM_MEMSLOTS:
                self.del_memslot(value)
            return None
        if io == QXL_IO_DESTROY_PRIMARY:
            self.primary = None  # qxl_destroy_primary: mode undefined, logging stays off
            return None
        if io not in (QXL_IO_MEMSLOT_ADD, QXL_IO_CREATE_PRIMARY):
            return None
        if self.ram is None:
            return "no RAM header"
        # Both read the guest's request through d->ram, the pointer init_qxl_ram made.
        if io == QXL_IO_MEMSLOT_ADD:
            mem_start, mem_end = HDR_MEM_SLOT.unpack(
                vma.read(self.ram + HDR_MEM_SLOT_OFFSET, HDR_MEM_SLOT.size)
            )
            return self.add_memslot(value, mem_start, mem_end)
        w, h, stride, fmt, _pos, _mouse, _flags, _type, mem = HDR_CREATE_SURFACE.unpack(
            vma.read(self.ram + HDR_CREATE_SURFACE_OFFSET, HDR_CREATE_SURFACE.size)
        )
        return self.create_primary(Primary(w, h, stride, fmt, mem))

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
        """The primary surface as the SPICE server reads it: through its memslot."""
        if self.primary is None:
            return None
        ptr = self.spice_virt(self.primary.mem)
        return None if ptr is None else (ptr, self.primary.stride * self.primary.height)

    def derived_pointers(self) -> dict[str, tuple[int | None, int | None]]:
        """Each pointer QXL or SPICE keeps, against what the RAM block's pointer gives now."""
        host = self.vga.vram.host
        out: dict[str, tuple[int | None, int | None]] = {
            "ram": (self.ram, None if host is None else host + self.ram_header_offset)
        }
        if self.last_release is not None:
            out["last_release"] = (self.last_release, None)
        for i, slot in self.spice_memslots.items():
            g = self.guest_slots[i]
            expected = None if host is None or not g.active else host + g.offset
            out[f"spice_memslot{i}.virt_start"] = (slot.virt_start, expected)
        if self.primary is not None:
            out["primary_surface"] = (
                self.spice_virt(self.primary.mem),
                self.phys2virt(self.primary.mem),
            )
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
        """``qxl_post_load``: ``qxl_create_memslots``, then (native mode)
        ``qxl_create_guest_primary`` from the saved surface, not from ``d->ram``."""
        state, self._pending = self._pending, None
        if state is None:
            return
        for i in range(NUM_MEMSLOTS):
            self.del_memslot(i)
        for i, s in enumerate(state["guest_slots"]):
            if s["active"]:
                self.add_memslot(i, s["mem_start"], s["mem_end"])
        p = state["primary"]
        self.primary = None
        if p is not None:
            self.create_primary(
                Primary(p["width"], p["height"], p["stride"], p["format"], p["mem"])
            )


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

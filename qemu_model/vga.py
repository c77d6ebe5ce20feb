"""The VGA family: the common VRAM (``vga_common_init``) and the standard VGA with VBE.

``vga_common_init`` (hw/display/vga.c) creates the ``vga.vram`` RAM block, registers it
as Xen's framebuffer, caches ``vram_ptr`` from the block's host pointer and turns on VGA dirty
logging (``vga_dirty_log_start``); all of this happens at realize time, BEFORE an incoming
device state is loaded.  Whether logging is on decides what ``xen_set_memory`` does with the
VRAM when it enters or leaves the address space (:meth:`qemu_model.machine.Machine.set_memory`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Protocol

from hypervisor_sim import vma

from .memory import RamBlock
from .pci import PCIBar, PCIDevice

VRAM_NAME: Final = "vga.vram"

# VBE "DISPI" interface of QEMU's stdvga (hw/display/vga.c, Bochs VBE).
VBE_DISPI_IOPORT_INDEX: Final = 0x1CE
VBE_DISPI_IOPORT_DATA: Final = 0x1CF
VBE_DISPI_INDEX_ID: Final = 0x0
VBE_DISPI_INDEX_XRES: Final = 0x1
VBE_DISPI_INDEX_YRES: Final = 0x2
VBE_DISPI_INDEX_BPP: Final = 0x3
VBE_DISPI_INDEX_ENABLE: Final = 0x4
VBE_DISPI_INDEX_BANK: Final = 0x5
VBE_DISPI_INDEX_VIRT_WIDTH: Final = 0x6
VBE_DISPI_INDEX_VIRT_HEIGHT: Final = 0x7
VBE_DISPI_INDEX_X_OFFSET: Final = 0x8
VBE_DISPI_INDEX_Y_OFFSET: Final = 0x9
VBE_DISPI_INDEX_VIDEO_MEMORY_64K: Final = 0xA
VBE_DISPI_INDEX_NB: Final = 0xB
VBE_DISPI_ID5: Final = 0xB0C5
VBE_DISPI_ENABLED: Final = 0x01
VBE_DISPI_LFB_ENABLED: Final = 0x40
VBE_BPPS: Final = frozenset({8, 15, 16, 24, 32})


class MachineOps(Protocol):
    """What a device needs from the machine: RAM blocks and the memory listener."""

    def ram_block_add(self, name: str, size: int) -> RamBlock: ...

    def get_ram_ptr(self, block: RamBlock) -> int | None: ...

    def register_framebuffer(self, block: RamBlock) -> None: ...

    def region_add(self, block: RamBlock, start_addr: int, size: int) -> None: ...

    def region_del(self, block: RamBlock, start_addr: int, size: int) -> None: ...

    def register_pointer_fixup(self, fixup: Callable[[int, int], None]) -> None: ...


class VGACommon:
    """``VGACommonState``'s VRAM half: the block and the pointer devices keep."""

    def __init__(self, machine: MachineOps, vram_size: int) -> None:
        self.vram_size = vram_size
        self.vram = machine.ram_block_add(VRAM_NAME, vram_size)
        machine.register_framebuffer(self.vram)
        self.vram_ptr: int | None = machine.get_ram_ptr(self.vram)
        self.vram_ptr_at_init = self.vram_ptr
        # The pointer-fixup reconstruction knows this one pointer of every VGA device.
        machine.register_pointer_fixup(self._fixup_vram_ptr)
        self.dirty_log_start()

    def dirty_log_start(self) -> None:
        """``vga_dirty_log_start``: VGA dirty logging on the VRAM region."""
        self.vram.log_dirty = True

    def dirty_log_stop(self) -> None:
        """``vga_dirty_log_stop`` (only QXL calls it, leaving VGA mode)."""
        self.vram.log_dirty = False

    def _fixup_vram_ptr(self, old: int, new: int) -> None:
        if self.vram_ptr is not None and old <= self.vram_ptr < old + self.vram_size:
            self.vram_ptr = new + (self.vram_ptr - old)

    def read(self, offset: int, length: int) -> bytes | None:
        """Bytes of VRAM through ``vram_ptr``."""
        if self.vram_ptr is None or offset < 0 or offset + length > self.vram_size:
            return None
        return vma.read(self.vram_ptr + offset, length)


Framebuffer = tuple[int, int]  # (host pointer, length)


class VGAPCIDevice(PCIDevice):
    """A VGA-class PCI function at 00:02.0 whose BAR 0 shows ``vga.vram``."""

    kind: ClassVar[str]
    VENDOR_ID: ClassVar[int]
    DEVICE_ID: ClassVar[int]
    REVISION: ClassVar[int] = 0

    def __init__(self, machine: MachineOps, vram_size: int) -> None:
        super().__init__(self.VENDOR_ID, self.DEVICE_ID, self.REVISION)
        self.machine = machine
        self.vga = VGACommon(machine, vram_size)

    # Hooks the machine dispatches to.

    def pio_read(self, port: int, size: int) -> int | None:
        """A port read, or None when the port is not this device's."""
        return None

    def pio_write(self, port: int, size: int, value: int) -> bool:
        """A port write; False when the port is not this device's."""
        return False

    def framebuffer(self) -> Framebuffer | None:
        """The visible framebuffer as the device sees it: through its own pointers."""
        return None

    def derived_pointers(self) -> dict[str, tuple[int | None, int | None]]:
        """Pointers computed from ``vram_ptr``: name -> (held, expected from vram_ptr now)."""
        return {}

    def save_state(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: Mapping[str, Any]) -> str | None:
        """Why ``state`` (this device's section) cannot be loaded, or None."""
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Device registers from the image (after the PCI config)."""

    def post_load(self) -> None:
        """The device's post_load hook."""

    def mode_info(self) -> dict[str, Any] | None:
        return None

    # BAR 0 is the VRAM for stdvga and QXL; cirrus overrides this.

    def bar_moved(self, bar: PCIBar, old: int | None, new: int | None) -> None:
        if bar.index != 0:
            return
        if old is not None:
            self.machine.region_del(self.vga.vram, old, self.vga.vram_size)
        if new is not None:
            self.machine.region_add(self.vga.vram, new, self.vga.vram_size)

    def bar0_addr(self) -> int | None:
        bar = self.bars[0]
        return bar.addr if bar is not None else None


def _u16(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
        raise ValueError("not a 16-bit register value")
    return v


class StdVGA(VGAPCIDevice):
    """QEMU's ``VGA`` (1234:1111): the LFB in BAR 0 and Bochs VBE at 0x1ce/0x1cf."""

    kind = "stdvga"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x1111
    REVISION = 2

    def __init__(self, machine: MachineOps, vram_size: int) -> None:
        super().__init__(machine, vram_size)
        self.register_bar(0, vram_size, io=False, prefetch=True)
        self.vbe_index = 0
        self.vbe_regs = [0] * VBE_DISPI_INDEX_NB
        self.vbe_regs[VBE_DISPI_INDEX_ID] = VBE_DISPI_ID5
        self.vbe_regs[VBE_DISPI_INDEX_VIDEO_MEMORY_64K] = vram_size >> 16

    def pio_read(self, port: int, size: int) -> int | None:
        if port == VBE_DISPI_IOPORT_INDEX:
            return self.vbe_index
        if port == VBE_DISPI_IOPORT_DATA:
            if self.vbe_index < VBE_DISPI_INDEX_NB:
                return self.vbe_regs[self.vbe_index]
            return 0
        return None

    def pio_write(self, port: int, size: int, value: int) -> bool:
        if port == VBE_DISPI_IOPORT_INDEX:
            self.vbe_index = value & 0xFFFF
            return True
        if port != VBE_DISPI_IOPORT_DATA:
            return False
        idx, value = self.vbe_index, value & 0xFFFF
        if (
            idx in (VBE_DISPI_INDEX_ID, VBE_DISPI_INDEX_VIDEO_MEMORY_64K)
            or idx >= VBE_DISPI_INDEX_NB
        ):
            return True  # read-only here (the ID handshake is accepted and ignored)
        if idx == VBE_DISPI_INDEX_BPP and value == 0:
            value = 8
        if idx == VBE_DISPI_INDEX_ENABLE and value & VBE_DISPI_ENABLED:
            # vbe_update: the virtual width defaults to the visible one.
            self.vbe_regs[VBE_DISPI_INDEX_VIRT_WIDTH] = self.vbe_regs[VBE_DISPI_INDEX_XRES]
            self.vbe_regs[VBE_DISPI_INDEX_X_OFFSET] = 0
            self.vbe_regs[VBE_DISPI_INDEX_Y_OFFSET] = 0
        self.vbe_regs[idx] = value
        return True

    def mode_info(self) -> dict[str, Any] | None:
        r = self.vbe_regs
        if (
            not r[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_ENABLED
            or r[VBE_DISPI_INDEX_BPP] not in VBE_BPPS
        ):
            return None
        bpp = r[VBE_DISPI_INDEX_BPP]
        line = r[VBE_DISPI_INDEX_VIRT_WIDTH] * ((bpp + 7) // 8)
        start = r[VBE_DISPI_INDEX_Y_OFFSET] * line + r[VBE_DISPI_INDEX_X_OFFSET] * ((bpp + 7) // 8)
        return {
            "width": r[VBE_DISPI_INDEX_XRES],
            "height": r[VBE_DISPI_INDEX_YRES],
            "bpp": bpp,
            "stride": line,
            "start": start,
        }

    def framebuffer(self) -> Framebuffer | None:
        mode = self.mode_info()
        ptr = self.vga.vram_ptr
        if mode is None or ptr is None:
            return None
        length = mode["height"] * mode["stride"]
        if length == 0 or mode["start"] + length > self.vga.vram_size:
            return None
        return ptr + mode["start"], length

    def save_state(self) -> dict[str, Any]:
        return {"vbe_index": self.vbe_index, "vbe_regs": list(self.vbe_regs)}

    def check_state(self, state: Mapping[str, Any]) -> str | None:
        try:
            _u16(state["vbe_index"])
            regs = state["vbe_regs"]
            if not isinstance(regs, list) or len(regs) != VBE_DISPI_INDEX_NB:
                return f"vbe_regs must be a list of {VBE_DISPI_INDEX_NB} registers"
            for v in regs:
                _u16(v)
        except (KeyError, ValueError) as exc:
            return f"bad stdvga state: {exc}"
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.vbe_index = state["vbe_index"]
        self.vbe_regs = list(state["vbe_regs"])
        self.vbe_regs[VBE_DISPI_INDEX_VIDEO_MEMORY_64K] = self.vga.vram_size >> 16

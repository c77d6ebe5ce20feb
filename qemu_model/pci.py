"""A PCI function's configuration space and BAR decoding (QEMU ``hw/pci/pci.c``, reduced).

The standard type-0 header: writes go through a write mask, BARs hide their size bits (so the
guest can size them by writing all ones), and any write to the command register or a BAR
re-evaluates where each BAR is mapped, as ``pci_update_mappings`` does.  Changes reach the
device through :meth:`PCIDevice.bar_moved`, which is where the memory listener's
``region_del``/``region_add`` come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PCI_CONFIG_SPACE_SIZE: Final = 256
PCI_VENDOR_ID: Final = 0x00
PCI_DEVICE_ID: Final = 0x02
PCI_COMMAND: Final = 0x04
PCI_COMMAND_IO: Final = 0x1
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4
PCI_REVISION_ID: Final = 0x08
PCI_CLASS_PROG: Final = 0x09
PCI_CLASS_DEVICE: Final = 0x0A
PCI_HEADER_TYPE: Final = 0x0E
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_SUBSYSTEM_ID: Final = 0x2E
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_BASE_ADDRESS_SPACE_IO: Final = 0x1
PCI_BASE_ADDRESS_MEM_PREFETCH: Final = 0x8
PCI_CLASS_DISPLAY_VGA: Final = 0x0300
PCI_NUM_BARS: Final = 6

#: The VGA device of docs/architecture.md: 0000:00:02.0.
VGA_SBDF: Final = 0x10


@dataclass
class PCIBar:
    index: int
    size: int
    io: bool
    prefetch: bool = False
    addr: int | None = None  # where it is decoded now, None when unmapped

    @property
    def flags(self) -> int:
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0


class PCIDevice:
    """Config space of one function with 32-bit BARs."""

    def __init__(
        self, vendor_id: int, device_id: int, revision: int = 0, class_id: int = 0x0300
    ) -> None:
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.bars: list[PCIBar | None] = [None] * PCI_NUM_BARS
        self._set16(PCI_VENDOR_ID, vendor_id)
        self._set16(PCI_DEVICE_ID, device_id)
        self.config[PCI_REVISION_ID] = revision
        self._set16(PCI_CLASS_DEVICE, class_id)
        self._set16(PCI_SUBSYSTEM_VENDOR_ID, 0x1AF4)
        self._set16(PCI_SUBSYSTEM_ID, 0x1100)
        self._set16(PCI_COMMAND, 0)
        self.wmask[PCI_COMMAND] = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF

    @property
    def vendor_id(self) -> int:
        return self._get(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self._get(PCI_DEVICE_ID, 2)

    def register_bar(self, index: int, size: int, *, io: bool, prefetch: bool = False) -> None:
        """``pci_register_bar``: size is a power of two; the low bits are read-only."""
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR size {size:#x} is not a usable power of two")
        bar = PCIBar(index, size, io, prefetch)
        self.bars[index] = bar
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        self._set32(reg, bar.flags)
        mask = ~(size - 1) & 0xFFFFFFFF
        for i in range(4):
            self.wmask[reg + i] = (mask >> (8 * i)) & 0xFF

    # ----------------------------------------------------------------------------------------
    # Guest accesses

    def config_read(self, reg: int, size: int) -> int:
        if size not in (1, 2, 4) or reg < 0 or reg + size > PCI_CONFIG_SPACE_SIZE:
            return (1 << (8 * min(max(size, 1), 4))) - 1
        return self._get(reg, size)

    def config_write(self, reg: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or reg < 0 or reg + size > PCI_CONFIG_SPACE_SIZE:
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            m = self.wmask[reg + i]
            self.config[reg + i] = (self.config[reg + i] & ~m) | (byte & m)
        bars_end = PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS
        if (reg < PCI_COMMAND + 2 and reg + size > PCI_COMMAND) or (
            reg < bars_end and reg + size > PCI_BASE_ADDRESS_0
        ):
            self.update_mappings()

    # ----------------------------------------------------------------------------------------
    # BAR decoding

    def bar_address(self, bar: PCIBar) -> int | None:
        """``pci_bar_address``: where the BAR decodes, or None (unmapped)."""
        cmd = self._get(PCI_COMMAND, 2)
        raw = self._get(PCI_BASE_ADDRESS_0 + 4 * bar.index, 4)
        if bar.io:
            if not cmd & PCI_COMMAND_IO:
                return None
            addr = raw & ~(bar.size - 1) & 0xFFFC
            limit = 0x10000
        else:
            if not cmd & PCI_COMMAND_MEMORY:
                return None
            addr = raw & ~(bar.size - 1) & 0xFFFFFFF0
            limit = 1 << 32
        # As QEMU: address 0, and a range running past the decoder's limit, mean unmapped.
        if addr == 0 or addr + bar.size > limit:
            return None
        return addr

    def update_mappings(self) -> None:
        """``pci_update_mappings``: move each BAR whose decoded address changed."""
        for bar in self.bars:
            if bar is None:
                continue
            new = self.bar_address(bar)
            if new == bar.addr:
                continue
            old = bar.addr
            bar.addr = new
            self.bar_moved(bar, old, new)

    def bar_moved(self, bar: PCIBar, old: int | None, new: int | None) -> None:
        """Hook: the BAR stopped decoding at ``old`` and/or started at ``new``."""

    # ----------------------------------------------------------------------------------------
    # vmstate: the whole config space, as QEMU's "PCIDevice" section

    def save_config(self) -> bytes:
        return bytes(self.config)

    def check_config(self, config: bytes) -> str | None:
        """Why ``config`` cannot be loaded into this device (None if it can).

        As ``get_pci_config_device``: the read-only identity must match.
        """
        if len(config) != PCI_CONFIG_SPACE_SIZE:
            return f"PCI config is {len(config)} bytes, expected {PCI_CONFIG_SPACE_SIZE}"
        for reg in (PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_CLASS_DEVICE):
            if config[reg : reg + 2] != self.config[reg : reg + 2]:
                return (
                    f"PCI config mismatch at {reg:#04x}: image has "
                    f"{int.from_bytes(config[reg : reg + 2], 'little'):#06x}, device is "
                    f"{self._get(reg, 2):#06x}"
                )
        return None

    def load_config(self, config: bytes) -> None:
        """Copy the saved config in, then update the BAR mappings (QEMU's order,
        docs/qemu-physmap.md, 'Restore, new mode')."""
        self.config[:] = config
        self.update_mappings()

    # ----------------------------------------------------------------------------------------

    def _get(self, reg: int, size: int) -> int:
        return int.from_bytes(self.config[reg : reg + size], "little")

    def _set16(self, reg: int, value: int) -> None:
        self.config[reg : reg + 2] = value.to_bytes(2, "little")

    def _set32(self, reg: int, value: int) -> None:
        self.config[reg : reg + 4] = value.to_bytes(4, "little")

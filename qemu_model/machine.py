"""The Xen HVM machine of one device model: mapcache, physmap, RAM blocks and one VGA device.

Everything here is synchronous, like QEMU's device code under the big lock.  The process
shell owns the I/O; it calls :meth:`Machine.handle_ioreq` for each guest access and the
``*_devices_state`` methods for QMP.

Init order (docs/qemu-physmap.md, 'Reading the keys back', 2017 ``xen_hvm_init``): mapcache → RAM →
listeners → ``xen_read_physmap`` → devices.  A restore is an incoming load in runstate ``inmigrate``
(K6: there is no other "restore" signal).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, Final, Literal

from hypervisor_sim import vma

from .cirrus import Cirrus
from .dirty_vram import DirtyHypercalls, DirtyVram
from .errors import LoadError, QemuAbort, QemuExit
from .mapcache import MapCache, RecordingNotifier
from .memory import RamBlock, RamList
from .pci import VGA_SBDF
from .qxl import QXL
from .vga import MachineOps, StdVGA, VGAPCIDevice
from .vmstate import DeviceState, decode, encode
from .xen_hvm import Hypercalls, Mode, XenHvm, XenStore
from .xen_native import CompatForeignMemory, compat_restrict_all
from .xenforeignmemory import ForeignMemoryLike

log = logging.getLogger(__name__)

DEVICES: Final[dict[str, Callable[[MachineOps, int], VGAPCIDevice]]] = {
    "stdvga": StdVGA,
    "cirrus": Cirrus,
    "qxl": QXL,
}

RunState = Literal[
    "prelaunch",
    "inmigrate",
    "running",
    "paused",
    "postmigrate",
    "save-vm",
    "restore-vm",
    "shutdown",
]

IoreqType = Literal["pio", "copy", "pci_config", "invalidate"]


class Machine:
    """One guest's device model state.  ``incoming`` starts it in runstate INMIGRATE."""

    def __init__(
        self,
        *,
        domid: int,
        mode: Mode,
        device: str,
        ram_size: int,
        vram_size: int,
        fmem: ForeignMemoryLike,
        hypercalls: Hypercalls,
        xenstore: XenStore | None,
        incoming: bool,
        trace: Callable[[str], None] | None = None,
        dirty: DirtyHypercalls | None = None,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}")
        self.domid = domid
        self.mode: Mode = mode
        self.device_kind = device
        self.runstate: RunState = "inmigrate" if incoming else "prelaunch"
        self.restricted = False
        # Compat builds see only the map2 shim (docs/qemu-physmap.md, 'XEN_COMPAT_PHYSMAP').
        fm: ForeignMemoryLike = CompatForeignMemory(fmem) if mode == "compat" else fmem
        self.xen = XenHvm(domid, mode, hypercalls, xenstore, fm, self.in_migrate)
        self.notifier = RecordingNotifier()
        # docs/qemu-physmap.md, 'The mapcache': the translation callback only in compat builds.
        self.mapcache = MapCache(
            fm,
            domid,
            self.in_migrate,
            self.xen.phys_offset_to_gaddr if mode == "compat" else None,
            notifier=self.notifier,
            trace=trace or log.info,
        )
        self.xen.mapcache = self.mapcache
        self.dirty_vram = DirtyVram(domid, dirty)
        self.ram = RamList(ram_size)
        self.xen.read_physmap()
        self.device: VGAPCIDevice = DEVICES[device](self, vram_size)

    def in_migrate(self) -> bool:
        return self.runstate == "inmigrate"

    # ----------------------------------------------------------------------------------------
    # MachineOps: RAM blocks and the memory listener

    def ram_block_add(self, name: str, size: int) -> RamBlock:
        block = self.ram.add(name, size)
        self.xen.ram_alloc(block)
        return block

    def get_ram_ptr(self, block: RamBlock) -> int | None:
        """``qemu_map_ram_ptr`` under Xen (docs/qemu-physmap.md, 'VRAM and the devices'): map the
        whole block once, locked."""
        if block.host is None:
            block.host = self.mapcache.map(block.offset, block.max_length, lock=True)
        return block.host

    def register_framebuffer(self, block: RamBlock) -> None:
        self.xen.register_framebuffer(block)

    def region_add(self, block: RamBlock, start_addr: int, size: int) -> None:
        """``xen_region_add`` for a RAM section with VGA dirty logging on; the listener's
        ``log_start`` follows for the relocated framebuffer (dirty_vram.py)."""
        self.xen.add_to_physmap(start_addr, size, block)
        if self.xen.get_physmapping(start_addr, size) is not None:
            self.dirty_vram.log_start(start_addr, size)

    def region_del(self, block: RamBlock, start_addr: int, size: int) -> None:
        if self.dirty_vram.logging is not None and self.dirty_vram.logging[0] == start_addr:
            self.dirty_vram.log_stop()
        self.xen.remove_from_physmap(start_addr, size)

    # ----------------------------------------------------------------------------------------
    # Privileges (docs/qemu-physmap.md, 'Restriction')

    def restrict(self, restrict_all: Callable[[int], int]) -> None:
        """``xen_restrict`` in the accelerator's setup_post: ``restrict_all`` restricts the
        hypervisor connections and returns 0 or a negative errno."""
        rc = compat_restrict_all(self.domid) if self.mode == "compat" else restrict_all(self.domid)
        if rc < 0:
            raise QemuExit("xen: failed to restrict", 1)
        self.xen.xenstore = None
        self.restricted = True

    # ----------------------------------------------------------------------------------------
    # ioreqs

    def handle_ioreq(self, type: str, dir: str, addr: int, size: int, data: int) -> int:
        """Emulate one access; returns the value for a read (all ones when nothing answers)."""
        ones = (1 << (8 * max(1, min(size, 8)))) - 1
        try:
            if type == "pio":
                if dir == "read":
                    value = self.device.pio_read(addr, size)
                    return ones if value is None else value & ones
                self.device.pio_write(addr, size, data & ones)
                return 0
            if type == "pci_config":
                sbdf, reg = addr >> 32, addr & 0xFFFFFFFF
                if sbdf != VGA_SBDF:
                    return ones if dir == "read" else 0
                if dir == "read":
                    return self.device.config_read(reg, size)
                self.device.config_write(reg, size, data & ones)
                return 0
            if type == "invalidate":
                self.mapcache.invalidate()
                return 0
        except (QemuAbort, QemuExit):
            raise
        except Exception:
            # A guest access never takes the device model down.
            log.exception("ioreq %s %s %#x failed", type, dir, addr)
        # MMIO ("copy") to nothing we emulate: reads float high, writes are dropped.
        return ones if dir == "read" else 0

    # ----------------------------------------------------------------------------------------
    # Device state

    def save_devices_state(self) -> bytes:
        dev = self.device
        bars = [
            {"index": b.index, "size": b.size, "io": b.io, "addr": b.addr}
            for b in dev.bars
            if b is not None
        ]
        return encode(
            self.device_kind,
            dev.vga.vram_size,
            VGA_SBDF,
            dev.save_config(),
            bars,
            dev.save_state(),
        )

    def check_devices_state(self, data: bytes) -> DeviceState:
        """Parse and check a device-state file without applying it."""
        state = decode(data)
        if state.device != self.device_kind:
            raise LoadError(f"device state is for {state.device!r}, this is {self.device_kind!r}")
        if state.vram_size != self.device.vga.vram_size:
            raise LoadError(
                f"device state has {state.vram_size:#x} bytes of VRAM, "
                f"this device has {self.device.vga.vram_size:#x}"
            )
        why = self.device.check_config(state.pci_config) or self.device.check_state(
            state.device_section
        )
        if why is not None:
            raise LoadError(why)
        return state

    def load_devices_state(self, data: bytes) -> None:
        """Load in QEMU's order: PCI config (→ BAR mapping → region_add → xen_add_to_physmap),
        then the device registers and post_load.  Nothing is applied if the file is bad."""
        state = self.check_devices_state(data)
        incoming = self.in_migrate()
        self.device.load_config(state.pci_config)
        self.device.load_state(state.device_section)
        self.device.post_load()
        if incoming and self.mode == "pointer-fixup":
            self._fixup_pointers()

    def _fixup_pointers(self) -> None:
        """The rejected scheme (docs/qemu-physmap.md, 'Why not patch the pointers'): patch the VRAM
        pointers we know about — ``vram_ptr`` — with a fresh mapping of the real frames at a new
        address."""
        vga = self.device.vga
        new = self.xen.map_relocated(vga.vram)
        if new is not None:
            log.info("pointer-fixup: vga.vram_ptr %#x -> %#x", vga.vram_ptr or 0, new)
            vga.vram_ptr = new

    # ----------------------------------------------------------------------------------------
    # Introspection

    def display(self) -> bytes | None:
        """The visible framebuffer read through the device's own pointers."""
        fb = self.device.framebuffer()
        if fb is None:
            return None
        ptr, length = fb
        return vma.read(ptr, length)

    def info(self) -> dict[str, Any]:
        """The ``x-physmap-info`` reply."""
        dev = self.device
        derived = dev.derived_pointers()
        fb = self.display()
        xs_ops = self.xen.xenstore_accounting.ops
        return {
            "mode": self.mode,
            "device": self.device_kind,
            "domid": self.domid,
            "runstate": self.runstate,
            "restricted": self.restricted,
            "vram_size": dev.vga.vram_size,
            "phys_offset": dev.vga.vram.offset,
            "vram_ptr": dev.vga.vram_ptr,
            "vram_ptr_at_init": dev.vga.vram_ptr_at_init,
            "block_host": dev.vga.vram.host,
            "bar0": dev.bar0_addr(),
            "derived_ptrs": {
                name: {"ptr": held, "expected": expected}
                for name, (held, expected) in derived.items()
            },
            "derived_ptrs_valid": all(
                held is not None and held == expected for held, expected in derived.values()
            ),
            "display": dev.mode_info(),
            "display_sha256": None if fb is None else hashlib.sha256(fb).hexdigest(),
            "physmap": [p.to_json() for p in self.xen.physmap],
            "mapcache": {
                **self.mapcache.info(),
                "notifier_calls": [list(c) for c in self.notifier.calls],
            },
            "dirty_vram": self.dirty_vram.info(),
            "xenstore_physmap_ops": len(xs_ops),
            "xenstore_physmap_log": [{"op": op, "path": path, "ok": ok} for op, path, ok in xs_ops],
        }

    def close(self) -> None:
        """Unmap every mapping the device model made."""
        self.xen.close()
        self.mapcache.destroy()

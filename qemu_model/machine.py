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
import importlib
import logging
from collections.abc import Callable
from typing import Any, Final, Literal

from hypervisor_sim import vma

from .dirty_vram import DirtyHypercalls, DirtyVram
from .errors import LoadError, QemuAbort, QemuExit
from .mapcache import MapCache, RecordingNotifier
from .memory import RamBlock, RamList
from .pci import VGA_SBDF
from .version import QemuVersion
from .vga import VGAPCIDevice
from .vmstate import DeviceState, decode, encode
from .xen_hvm import Hypercalls, Mode, XenHvm, XenStore
from .xen_native import CompatForeignMemory, RestrictableHandles, xen_restrict
from .xenforeignmemory import ForeignMemoryLike

log = logging.getLogger(__name__)


#: Each display device's class, as ``module:Class``: an optional device's code loads only
#: when the machine builds it (cf. QEMU's per-device modules).
DEVICES: Final[dict[str, str]] = {
    "stdvga": "qemu_model.vga:StdVGA",
    "cirrus": "qemu_model.cirrus:Cirrus",
    "qxl": "qemu_model.qxl:QXL",
}


def device_class(name: str) -> type[VGAPCIDevice]:
    """The class of the registered display device ``name``."""
    module, _, cls = DEVICES[name].partition(":")
    found: type[VGAPCIDevice] = getattr(importlib.import_module(module), cls)
    return found


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
        version: QemuVersion | None = None,
        restricted_handles: tuple[str, ...] = (),
        dirty: DirtyHypercalls | None = None,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}")
        self.domid = domid
        self.mode: Mode = mode
        self.version = version or QemuVersion()
        self.device_kind = device
        self.runstate: RunState = "inmigrate" if incoming else "prelaunch"
        # QEMU 2.10 restricts in xen_hvm_init, before the machine exists.
        self.restricted_handles = restricted_handles
        self.restricted = bool(restricted_handles)
        # Compat builds see only the map2 shim (docs/qemu-physmap.md, 'XEN_COMPAT_PHYSMAP').
        fm: ForeignMemoryLike = CompatForeignMemory(fmem) if mode == "compat" else fmem
        self.xen = XenHvm(domid, mode, hypercalls, xenstore, fm, self.in_migrate, self.version)
        self.notifier = RecordingNotifier()
        # docs/qemu-physmap.md, 'The mapcache': the translation callback only in compat builds.
        self.mapcache = MapCache(
            fm,
            domid,
            self.in_migrate,
            self.xen.phys_offset_to_gaddr if mode == "compat" else None,
            notifier=self.notifier,
            trace=trace or log.info,
            version=self.version,
        )
        self.xen.mapcache = self.mapcache
        self.dirty_vram = DirtyVram(domid, dirty)
        self.ram = RamList(ram_size)
        self.xen.read_physmap()
        self.device: VGAPCIDevice = device_class(device)(self, vram_size)

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
        """``xen_region_add`` (``xen_set_memory`` gating below); the listener's ``log_start``
        follows for the relocated framebuffer (dirty_vram.py)."""
        self.set_memory(block, start_addr, size, add=True)
        if self.xen.get_physmapping(start_addr, size) is not None:
            self.dirty_vram.log_start(start_addr, size)

    def region_del(self, block: RamBlock, start_addr: int, size: int) -> None:
        """``xen_region_del`` (``xen_set_memory`` gating below)."""
        if self.dirty_vram.logging is not None and self.dirty_vram.logging[0] == start_addr:
            self.dirty_vram.log_stop()
        self.set_memory(block, start_addr, size, add=False)

    def set_memory(self, block: RamBlock, start_addr: int, size: int, *, add: bool) -> None:
        """``xen_set_memory`` (hw/i386/xen/xen-hvm.c) for a RAM section.

        It returns early when the region's VGA dirty logging differs from ``add``: a section
        is added to the physmap only while logging is on, and removed only while it is off.
        So the VRAM of stdvga and cirrus (always logging) never leaves its BAR address, and a
        QXL in native mode (logging off) is never added.
        """
        if block.log_dirty != add:
            return
        page = (1 << 12) - 1
        start_addr &= ~page
        size = (size + page) & ~page
        if add:
            self.xen.add_to_physmap(start_addr, size, block)
        else:
            self.xen.remove_from_physmap(start_addr, size)

    def register_pointer_fixup(self, fixup: Callable[[int, int], None]) -> None:
        """Remember a VRAM pointer for the pointer-fixup reconstruction."""
        self.xen.pointer_fixups.append(fixup)

    # ----------------------------------------------------------------------------------------
    # Privileges (docs/qemu-physmap.md, 'Restriction')

    def restrict(self, handles: RestrictableHandles) -> None:
        """``xen_restrict``: QEMU 2.10 restricts the devicemodel and foreignmemory handles (the
        process shell calls it before the machine exists); from 3.0 ``xen_setup_post`` restricts
        every handle and closes xenstore."""
        rc, restricted = xen_restrict(self.version, self.mode == "compat", self.domid, handles)
        if rc < 0:
            raise QemuExit("xen: failed to restrict", 1)
        self.restricted_handles = restricted
        self.restricted = bool(restricted)
        if "xenstore" in restricted:
            self.xen.xenstore = None

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
        self.device.load_config(state.pci_config)
        self.device.load_state(state.device_section)
        self.device.post_load()

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
            "qemu_version": str(self.version),
            "restricted_handles": list(self.restricted_handles),
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

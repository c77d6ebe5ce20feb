"""The Xen side of the machine (QEMU ``hw/i386/xen/xen-hvm.c``): RAM allocation and the physmap.

The physmap is the device model's list of RAM regions the guest has moved: where the guest
mapped the VRAM BAR (``start_addr``) and where the VRAM's frames live in ram_addr space
(``phys_offset``).  What happens to it depends on the mode (docs/qemu-physmap.md, 'The keys',
'Restore, new mode'):

* fresh boot, every mode: relocate the frames to the BAR and remember the entry; compat mode
  also writes the xenstore keys (K1, K2);
* restore, ``new``: swap the mapcache's dummy for the real frames at the same address (R1);
* restore, ``compat``: the entry read from xenstore at init already covers the BAR (R3);
* restore, ``pointer-fixup``: remember the entry; the machine patches the VRAM pointers it
  knows once the load is over (the rejected earlier attempt, docs/qemu-physmap.md, 'Why not patch
  the pointers').
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from hypervisor_sim import vma

from .errors import QemuAbort
from .mapcache import XC_PAGE_SHIFT, MapCache
from .memory import XEN_RAM_NAME, RamBlock
from .xenforeignmemory import ForeignMemoryFailed, ForeignMemoryLike

log = logging.getLogger(__name__)

Mode = Literal["new", "compat", "pointer-fixup"]
MODES: Final[tuple[Mode, ...]] = ("new", "compat", "pointer-fixup")

#: The legacy VGA window 0xa0000-0xbffff is never tracked (docs/qemu-physmap.md, 'When QEMU writes
#: the keys').
LEGACY_VGA_END: Final = 0xBFFFF


class Hypercalls(Protocol):
    """The blocking hypercalls the device model makes (the privcmd fd)."""

    def populate_physmap(self, domid: int, gfns: list[int]) -> int: ...

    def relocate_memory(self, domid: int, src_gfn: int, dst_gfn: int, nr: int) -> None: ...


class XenStore(Protocol):
    """The device model's own xenstore connection, made blocking.

    Failures are answered, not raised: ``read``/``directory`` give None, ``write`` False.
    """

    def read(self, path: str) -> str | None: ...

    def write(self, path: str, value: str) -> bool: ...

    def directory(self, path: str) -> list[str] | None: ...


@dataclass
class XenPhysmap:
    start_addr: int
    size: int
    name: str | None
    phys_offset: int

    def to_json(self) -> dict[str, object]:
        return {
            "start_addr": self.start_addr,
            "size": self.size,
            "name": self.name,
            "phys_offset": self.phys_offset,
        }


def physmap_dir(domid: int) -> str:
    """K1: the domain-0 component is hard-coded, even for a device model in a stub domain."""
    return f"/local/domain/0/device-model/{domid}/physmap"


def physmap_keys(domid: int, entry: XenPhysmap) -> list[tuple[str, str]]:
    """K1: the writes of ``xen_save_physmap``, in order: start_addr, size, then name if any.

    Lowercase hex without ``0x`` or padding (PRIx64), domid in decimal.
    """
    base = f"{physmap_dir(domid)}/{entry.phys_offset:x}"
    keys = [(f"{base}/start_addr", f"{entry.start_addr:x}"), (f"{base}/size", f"{entry.size:x}")]
    if entry.name is not None:
        keys.append((f"{base}/name", entry.name))
    return keys


@dataclass
class XenstoreAccounting:
    """Every xenstore request the device model made on physmap paths: (op, path, ok)."""

    ops: list[tuple[str, str, bool]] = field(default_factory=list)

    def record(self, op: str, path: str, ok: bool) -> None:
        self.ops.append((op, path, ok))


class XenHvm:
    """``XenIOState`` and the physmap functions of ``xen-hvm.c`` for one domain."""

    def __init__(
        self,
        domid: int,
        mode: Mode,
        hypercalls: Hypercalls,
        xenstore: XenStore | None,
        fmem: ForeignMemoryLike,
        in_migrate: Callable[[], bool],
    ) -> None:
        self.domid = domid
        self.mode: Mode = mode
        self._hc = hypercalls
        self.xenstore = xenstore  # None once closed (dm_restrict)
        self._fmem = fmem
        self._in_migrate = in_migrate
        self.physmap: list[XenPhysmap] = []  # index 0 is the list head
        self.framebuffer: RamBlock | None = None
        self.log_for_dirtybit: RamBlock | None = None
        self.xenstore_accounting = XenstoreAccounting()
        self.mapcache: MapCache | None = None
        # pointer-fixup: the fresh mappings made after the load, (vaddr, npages).
        self.fixup_mappings: list[tuple[int, int]] = []

    # ----------------------------------------------------------------------------------------
    # Translation (docs/qemu-physmap.md, 'Reading the keys back')

    def get_physmapping(self, start_addr: int, size: int) -> XenPhysmap | None:
        start_addr &= ~((1 << XC_PAGE_SHIFT) - 1)
        return next(
            (p for p in self.physmap if p.start_addr <= start_addr < p.start_addr + p.size),
            None,
        )

    def phys_offset_to_gaddr(self, phys_offset: int, size: int) -> int:
        """``xen_phys_offset_to_gaddr``: the mapcache's translation callback in compat mode."""
        addr = phys_offset & ~((1 << XC_PAGE_SHIFT) - 1)
        for p in self.physmap:
            if p.phys_offset <= addr < p.phys_offset + p.size:
                return p.start_addr + (addr - p.phys_offset)
        return addr

    # ----------------------------------------------------------------------------------------
    # RAM

    def ram_alloc(self, block: RamBlock) -> None:
        """``xen_ram_alloc`` (docs/qemu-physmap.md, 'VRAM and the devices'): populate a non-main
        block at its ram_addr gfns on a fresh boot; during INMIGRATE the memory comes from the
        image."""
        if self._in_migrate():
            log.warning(
                "xen: do not alloc %#x bytes of ram at %#x when runstate is INMIGRATE",
                block.max_length,
                block.offset,
            )
            return
        if block.name == XEN_RAM_NAME:
            return
        first = block.offset >> XC_PAGE_SHIFT
        npages = block.max_length >> XC_PAGE_SHIFT
        self._hc.populate_physmap(self.domid, list(range(first, first + npages)))

    def register_framebuffer(self, block: RamBlock) -> None:
        """``xen_register_framebuffer``: a single global; the last registration wins."""
        self.framebuffer = block

    # ----------------------------------------------------------------------------------------
    # The memory listener's physmap hooks (docs/qemu-physmap.md, 'When QEMU writes the keys')

    def add_to_physmap(
        self, start_addr: int, size: int, block: RamBlock, offset_within_region: int = 0
    ) -> int:
        """``xen_add_to_physmap``: 0 on success or when already tracked, -1 when not handled."""
        if self.get_physmapping(start_addr, size) is not None:
            return 0
        if block is not self.framebuffer or start_addr <= LEGACY_VGA_END:
            return -1
        phys_offset = block.offset + offset_within_region
        entry = XenPhysmap(start_addr, size, block.name, phys_offset)
        self.physmap.insert(0, entry)
        self.log_for_dirtybit = block

        if self._in_migrate():
            # docs/qemu-physmap.md, 'Restore, new mode', step 6: no relocation, no cache
            # pin, no xenstore write.
            if self.mode == "pointer-fixup":
                return 0
            assert self.mapcache is not None
            ptr = self.mapcache.replace_cache_entry(phys_offset, start_addr, size)
            if ptr is None or ptr != block.host:
                raise QemuAbort(
                    "xen_add_to_physmap: Assertion `p && p == memory_region_get_ram_ptr(mr)' "
                    "failed."
                )
            return 0

        try:
            self._hc.relocate_memory(
                self.domid,
                phys_offset >> XC_PAGE_SHIFT,
                start_addr >> XC_PAGE_SHIFT,
                size >> XC_PAGE_SHIFT,
            )
        except Exception as exc:
            log.error("xen: relocate_memory %#x -> %#x failed: %s", phys_offset, start_addr, exc)
            return -1
        # xen_save_physmap's result is ignored by the caller (docs/qemu-physmap.md, 'The keys'): a
        # failed write is silent.
        self.save_physmap(entry)
        return 0

    def remove_from_physmap(self, start_addr: int, size: int) -> int:
        """``xen_remove_from_physmap``: move the frames home; the xenstore keys stay
        (docs/qemu-physmap.md, 'When QEMU writes the keys')."""
        entry = self.get_physmapping(start_addr, size)
        if entry is None:
            return -1
        try:
            self._hc.relocate_memory(
                self.domid,
                entry.start_addr >> XC_PAGE_SHIFT,
                entry.phys_offset >> XC_PAGE_SHIFT,
                entry.size >> XC_PAGE_SHIFT,
            )
        except Exception as exc:
            log.error("xen: relocate_memory back to %#x failed: %s", entry.phys_offset, exc)
            return -1
        if self.log_for_dirtybit is not None and self.log_for_dirtybit.offset == entry.phys_offset:
            self.log_for_dirtybit = None
        self.physmap.remove(entry)
        return 0

    # ----------------------------------------------------------------------------------------
    # xenstore (compat only, docs/qemu-physmap.md, 'The keys', 'Reading the keys back')

    def save_physmap(self, entry: XenPhysmap) -> int:
        """``xen_save_physmap``: the K1 writes in compat mode, a no-op stub otherwise."""
        if self.mode != "compat":
            return 0
        for path, value in physmap_keys(self.domid, entry):
            ok = self.xenstore is not None and self.xenstore.write(path, value)
            self.xenstore_accounting.record("write", path, ok)
            if not ok:
                return -1
        return 0

    def read_physmap(self) -> None:
        """``xen_read_physmap`` at machine init: fill the list from xenstore in compat mode."""
        if self.mode != "compat":
            return
        base = physmap_dir(self.domid)
        children = self._xs_directory(base)
        if children is None:
            return
        for child in children:
            try:
                phys_offset = int(child, 16)
            except ValueError:
                log.warning("xen: ignoring physmap entry %r: not a hex ram_addr", child)
                continue
            start = self._xs_read(f"{base}/{child}/start_addr")
            size = self._xs_read(f"{base}/{child}/size")
            if start is None or size is None:
                continue
            try:
                start_addr, nbytes = int(start, 16), int(size, 16)
            except ValueError:
                log.warning("xen: ignoring physmap entry %r: bad start_addr/size", child)
                continue
            name = self._xs_read(f"{base}/{child}/name")
            self.physmap.insert(0, XenPhysmap(start_addr, nbytes, name, phys_offset))

    def _xs_read(self, path: str) -> str | None:
        value = self.xenstore.read(path) if self.xenstore is not None else None
        self.xenstore_accounting.record("read", path, value is not None)
        return value

    def _xs_directory(self, path: str) -> list[str] | None:
        value = self.xenstore.directory(path) if self.xenstore is not None else None
        self.xenstore_accounting.record("directory", path, value is not None)
        return value

    # ----------------------------------------------------------------------------------------
    # pointer-fixup (docs/qemu-physmap.md, 'Why not patch the pointers')

    def map_relocated(self, block: RamBlock) -> int | None:
        """Map the frames of ``block``'s physmap entry at a NEW address (no MAP_FIXED)."""
        entry = next((p for p in self.physmap if p.phys_offset == block.offset), None)
        if entry is None:
            return None
        first = entry.start_addr >> XC_PAGE_SHIFT
        npages = entry.size >> XC_PAGE_SHIFT
        pfns: Sequence[int] = range(first, first + npages)
        try:
            base, errs = self._fmem.map2(self.domid, None, vma.PROT_RW, 0, pfns)
        except ForeignMemoryFailed as exc:
            log.error("pointer-fixup: mapping %#x failed: %s", entry.start_addr, exc)
            return None
        self.fixup_mappings.append((base, npages))
        if any(errs):
            log.error(
                "pointer-fixup: %d frames at %#x did not map",
                sum(1 for e in errs if e),
                entry.start_addr,
            )
            return None
        return base

    def close(self) -> None:
        for base, npages in self.fixup_mappings:
            self._fmem.unmap(base, npages)
        self.fixup_mappings.clear()

"""The Xen side of the machine (QEMU ``hw/i386/xen/xen-hvm.c``): RAM allocation and the physmap.

The physmap is the device model's list of RAM regions the guest has moved: where the guest
mapped the VRAM BAR (``start_addr``) and where the VRAM's frames live in ram_addr space
(``phys_offset``).  What happens to it depends on the mode (qemu-physmap.md §1, §4):

* fresh boot, every mode: relocate the frames to the BAR and remember the entry; compat mode
  also writes the xenstore keys (K1, K2);
* restore, ``new``: swap the mapcache's dummy for the real frames at the same address (R1);
* restore, ``compat``: the entry read from xenstore at init already covers the BAR (R3);
* restore, ``pointer-fixup``: a reconstruction of the earlier attempt the series' cover letter
  describes and that was never merged: when the real foreign mapping is established (here, in
  ``xen_add_to_physmap`` during the load) it is made at a new address and the pointers the
  device model remembered are updated to it: the RAM block's host pointer and each device's
  registered ``vram_ptr``.

Relocation follows the QEMU version (:mod:`qemu_model.version`): 2.10 moves the frames with a
per-page ``xc_domain_add_to_physmap(XENMAPSPACE_gmfn)`` loop, later QEMU with
``xendevicemodel_relocate_memory``; both then pin the range's cache attribute to write-back.
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
from .version import QemuVersion
from .xenforeignmemory import ForeignMemoryFailed, ForeignMemoryLike

log = logging.getLogger(__name__)

Mode = Literal["new", "compat", "pointer-fixup"]
MODES: Final[tuple[Mode, ...]] = ("new", "compat", "pointer-fixup")

#: The legacy VGA window 0xa0000-0xbffff is never tracked (§1.2).
LEGACY_VGA_END: Final = 0xBFFFF
#: XEN_DOMCTL_MEM_CACHEATTR_WB (xen/include/public/domctl.h).
XEN_DOMCTL_MEM_CACHEATTR_WB: Final = 6
_ULLONG_MAX: Final = (1 << 64) - 1

#: A callback the pointer-fixup reconstruction calls with (old host pointer, new host pointer).
PointerFixup = Callable[[int, int], None]


def strtoull(text: str, base: int = 16) -> int:
    """C ``strtoull(text, NULL, base)``: whitespace, a sign, an optional ``0x``, then the longest
    run of digits; 0 when there are none, ULLONG_MAX on overflow, a minus sign wraps."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if base == 16 and s[:2].lower() == "0x" and s[2:3] and s[2:3] in "0123456789abcdefABCDEF":
        s = s[2:]
    digits = ""
    for ch in s:
        if ch.isascii() and ch.isalnum() and int(ch, 36) < base:
            digits += ch
        else:
            break
    if not digits:
        return 0
    value = int(digits, base)
    if value > _ULLONG_MAX:
        return _ULLONG_MAX
    return (-value) & _ULLONG_MAX if negative else value


class Hypercalls(Protocol):
    """The blocking hypercalls the device model makes (the privcmd fd)."""

    def populate_physmap(self, domid: int, gfns: list[int]) -> int: ...

    def add_to_physmap(self, domid: int, space: str, idx: int, gpfn: int) -> None: ...

    def add_to_physmap_each(self, domid: int, space: str, moves: list[tuple[int, int]]) -> None:
        """``add_to_physmap`` for each ``(idx, gpfn)`` in order; raises at the first failure."""
        ...

    def relocate_memory(self, domid: int, src_gfn: int, dst_gfn: int, nr: int) -> None: ...

    def pin_memory_cacheattr(self, domid: int, start: int, end: int, type: int) -> None: ...


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
        version: QemuVersion | None = None,
    ) -> None:
        self.domid = domid
        self.mode: Mode = mode
        self.version = version or QemuVersion()
        self._hc = hypercalls
        self.xenstore = xenstore  # None once closed (dm_restrict)
        self._fmem = fmem
        self._in_migrate = in_migrate
        self.physmap: list[XenPhysmap] = []  # index 0 is the list head
        self.framebuffer: RamBlock | None = None
        self.log_for_dirtybit: RamBlock | None = None
        self.xenstore_accounting = XenstoreAccounting()
        self.mapcache: MapCache | None = None
        # pointer-fixup: the fresh mappings made during the load, (vaddr, npages), and the
        # pointers devices asked to have updated.
        self.fixup_mappings: list[tuple[int, int]] = []
        self.pointer_fixups: list[PointerFixup] = []

    # ----------------------------------------------------------------------------------------
    # Translation (§1.4)

    def get_physmapping(self, start_addr: int, size: int) -> XenPhysmap | None:
        start_addr &= ~((1 << XC_PAGE_SHIFT) - 1)
        return next(
            (p for p in self.physmap if p.start_addr <= start_addr < p.start_addr + p.size),
            None,
        )

    def phys_offset_to_gaddr(self, phys_offset: int, size: int) -> int:
        """``xen_phys_offset_to_gaddr``: the mapcache's translation callback in compat mode.

        QEMU 2.10 answers the entry's ``start_addr`` itself, dropping the offset inside the
        entry; current QEMU adds it.  Without a covering entry the address comes back as given.
        """
        addr = phys_offset & ~((1 << XC_PAGE_SHIFT) - 1)
        for p in self.physmap:
            if p.phys_offset <= addr < p.phys_offset + p.size:
                if self.version.gaddr_keeps_offset:
                    return p.start_addr + (phys_offset - p.phys_offset)
                return p.start_addr
        return phys_offset

    # ----------------------------------------------------------------------------------------
    # RAM

    def ram_alloc(self, block: RamBlock) -> None:
        """``xen_ram_alloc`` (§4.1): populate a non-main block at its ram_addr gfns on a fresh
        boot; during INMIGRATE the memory comes from the image."""
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
    # The memory listener's physmap hooks (§1.2)

    def add_to_physmap(self, start_addr: int, size: int, block: RamBlock) -> int:
        """``xen_add_to_physmap``: 0 on success or when already tracked, else not handled.

        ``phys_offset`` is ``memory_region_get_ram_addr(mr)``: the section's offset inside the
        region plays no part.  The entry goes on the list before the relocation is tried, so a
        relocation that fails leaves it there, as in QEMU.
        """
        if self.get_physmapping(start_addr, size) is not None:
            return 0
        if size <= 0 or block is not self.framebuffer or start_addr <= LEGACY_VGA_END:
            return -1
        phys_offset = block.offset
        entry = XenPhysmap(start_addr, size, block.name, phys_offset)
        self.physmap.insert(0, entry)
        self.log_for_dirtybit = block

        if self._in_migrate():
            # §4.5 step 6: no relocation, no cache pin, no xenstore write.
            if self.mode == "pointer-fixup":
                self._fixup_pointers(block, entry)
                return 0
            assert self.mapcache is not None
            ptr = self.mapcache.replace_cache_entry(phys_offset, start_addr, size)
            if ptr is None or ptr != block.host:
                raise QemuAbort(
                    "xen_add_to_physmap: Assertion `p && p == memory_region_get_ram_ptr(mr)' "
                    "failed."
                )
            return 0

        rc = self._relocate(phys_offset, start_addr, size)
        if rc:
            return rc
        # The result of the pin is ignored (QEMU 2.10) or only logged (later).
        try:
            self._hc.pin_memory_cacheattr(
                self.domid,
                start_addr >> XC_PAGE_SHIFT,
                (start_addr + size - 1) >> XC_PAGE_SHIFT,
                XEN_DOMCTL_MEM_CACHEATTR_WB,
            )
        except Exception as exc:
            log.error("pin_memory_cacheattr failed: %s", exc)
        # xen_save_physmap's result is ignored by the caller (§1.1): a failed write is silent.
        return self.save_physmap(entry)

    def remove_from_physmap(self, start_addr: int, size: int) -> int:
        """``xen_remove_from_physmap``: move the frames home; the xenstore keys stay (§1.2)."""
        entry = self.get_physmapping(start_addr, size)
        if entry is None:
            return -1
        rc = self._relocate(start_addr & ~((1 << XC_PAGE_SHIFT) - 1), entry.phys_offset, entry.size)
        if rc:
            return rc
        if self.log_for_dirtybit is not None and self.log_for_dirtybit.offset == entry.phys_offset:
            self.log_for_dirtybit = None
        self.physmap.remove(entry)
        return 0

    def _relocate(self, src: int, dst: int, size: int) -> int:
        """Move ``size`` bytes of frames from gfn ``src`` to gfn ``dst``; 0 or a positive errno
        count as QEMU returns ``-rc`` (cf. xen-hvm.c: xen_add_to_physmap())."""
        nr = size >> XC_PAGE_SHIFT
        src_gfn, dst_gfn = src >> XC_PAGE_SHIFT, dst >> XC_PAGE_SHIFT
        if self.version.relocate_memory:
            try:
                self._hc.relocate_memory(self.domid, src_gfn, dst_gfn, nr)
            except Exception as exc:
                log.error("xen: relocate_memory %#x -> %#x failed: %s", src, dst, exc)
                return 1
            return 0
        # QEMU 2.10: one XENMAPSPACE_gmfn add_to_physmap per page; the first failure stops.
        moves = [(src_gfn + i, dst_gfn + i) for i in range(nr)]
        try:
            self._hc.add_to_physmap_each(self.domid, "gmfn", moves)
        except Exception as exc:
            log.error("add_to_physmap %#x -> %#x failed: %s", src_gfn, dst_gfn, exc)
            return 1
        return 0

    # ----------------------------------------------------------------------------------------
    # xenstore (compat only, §1.1 and §1.3)

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
            # QEMU parses every value with strtoull(..., 16) and checks none of them: garbage
            # becomes 0 or its numeric prefix and the entry is still inserted.
            start = self._xs_read(f"{base}/{child}/start_addr")
            if start is None:
                continue
            size = self._xs_read(f"{base}/{child}/size")
            if size is None:
                continue
            name = self._xs_read(f"{base}/{child}/name")
            self.physmap.insert(
                0, XenPhysmap(strtoull(start), strtoull(size), name, strtoull(child))
            )

    def _xs_read(self, path: str) -> str | None:
        value = self.xenstore.read(path) if self.xenstore is not None else None
        self.xenstore_accounting.record("read", path, value is not None)
        return value

    def _xs_directory(self, path: str) -> list[str] | None:
        value = self.xenstore.directory(path) if self.xenstore is not None else None
        self.xenstore_accounting.record("directory", path, value is not None)
        return value

    # ----------------------------------------------------------------------------------------
    # pointer-fixup (§4.7)

    def _fixup_pointers(self, block: RamBlock, entry: XenPhysmap) -> None:
        """The never-merged earlier attempt, reconstructed: map the real frames at a NEW
        address (no placement, no MAP_FIXED) and update the pointers it knows about.

        The dummy stays mapped and locked in the mapcache, so a pointer nobody updated still
        reads the dummy's zeros rather than faulting.
        """
        first = entry.start_addr >> XC_PAGE_SHIFT
        npages = entry.size >> XC_PAGE_SHIFT
        pfns: Sequence[int] = range(first, first + npages)
        try:
            new, errs = self._fmem.map2(self.domid, None, vma.PROT_RW, 0, pfns)
        except ForeignMemoryFailed as exc:
            log.error("pointer-fixup: mapping %#x failed: %s", entry.start_addr, exc)
            return
        self.fixup_mappings.append((new, npages))
        if any(errs):
            log.error(
                "pointer-fixup: %d frames at %#x did not map", sum(1 for e in errs if e), first
            )
            return
        old = block.host
        block.host = new
        log.info("pointer-fixup: %s host %#x -> %#x", block.name, old or 0, new)
        if old is not None:
            for fixup in self.pointer_fixups:
                fixup(old, new)

    def close(self) -> None:
        for base, npages in self.fixup_mappings:
            self._fmem.unmap(base, npages)
        self.fixup_mappings.clear()

"""QEMU's Xen mapcache (``hw/xen/xen-mapcache.c``): guest memory mapped in 1 MiB buckets.

Theory of operation (docs/qemu-physmap.md, 'The mapcache'):

* Guest memory is mapped bucket by bucket.  An entry maps ``size`` bytes (whole buckets) of the
  guest frames starting at bucket ``paddr_index`` and keeps a bitmap of the pages that mapped.
* Entries live in per-bucket chains; the head of each chain always exists (zeroed, unmapped
  until first use).  A locked entry (``lock > 0``) is never remapped or invalidated, and every
  locked pointer handed out is recorded in the reverse map ``locked_entries``.
* When a mapping fails, compat mode retries through the translation callback (the physmap read
  from xenstore), and during INMIGRATE a zero-filled anonymous DUMMY mapping is handed out.
* ``replace_cache_entry`` maps real frames over a dummy at the SAME virtual address: in QEMU
  2.10 by unmapping it and passing its address as a hint, in current QEMU with MAP_FIXED.
* RAM-block notifiers are told about new and removed mappings, but not about swaps that involve
  a dummy (the v3 change): they see one registration of the range throughout.

Like QEMU, lookups by a locked pointer (``ram_addr_from_mapcache``, ``invalidate_entry``) find
the entry by (index, size) alone and take the first match in the chain; if an unlocked head has
been remapped to the same (index, size) as a locked entry behind it, they pick the head.  Only
RAM blocks take locks here, one per block, so the device model never builds such twins.

This module is pure and synchronous: foreign memory, the runstate and the notifiers are
injected, and every mapping it makes is a real ``mmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from hypervisor_sim import vma

from .errors import QemuAbort, QemuExit
from .version import QemuVersion
from .xenforeignmemory import ForeignMemoryFailed, ForeignMemoryLike

# docs/qemu-physmap.md, 'The mapcache', 64-bit host.
MCACHE_BUCKET_SHIFT: Final = 20
MCACHE_BUCKET_SIZE: Final = 1 << MCACHE_BUCKET_SHIFT
MCACHE_MAX_SIZE: Final = 1 << 35
XC_PAGE_SHIFT: Final = 12
XC_PAGE_SIZE: Final = 1 << XC_PAGE_SHIFT

#: ``MapCacheEntry.flags`` bit 0 (patch 2 of the series).
XEN_MAPCACHE_ENTRY_DUMMY: Final = 1 << 0

#: ``MapCacheEntry.lock``: a uint8_t that silently wraps in QEMU 2.10 and 3.0; current QEMU
#: aborts before its counter overflows (cf. xen-mapcache.c: xen_map_cache_unlocked()).
_LOCK_MAX: Final = (1 << 32) - 1
_LOCK_MASK_U8: Final = 0xFF

#: ``phys_offset_to_gaddr_t``: (phys_offset, size) -> guest address.
PhysOffsetToGaddr = Callable[[int, int], int]


class RamBlockNotifier(Protocol):
    """``ram_block_notify_add`` / ``ram_block_notify_remove`` listeners."""

    def ram_block_added(self, host: int, size: int) -> None: ...

    def ram_block_removed(self, host: int, size: int) -> None: ...


@dataclass(eq=False)
class MapCacheEntry:
    paddr_index: int = 0
    vaddr_base: int | None = None
    valid_mapping: int = 0  # bit i: page i of the mapping is valid
    lock: int = 0
    flags: int = 0
    size: int = 0

    @property
    def dummy(self) -> bool:
        return bool(self.flags & XEN_MAPCACHE_ENTRY_DUMMY)

    def test_bits(self, first_page: int, npages: int) -> bool:
        mask = ((1 << npages) - 1) << first_page
        return self.valid_mapping & mask == mask


@dataclass(frozen=True, eq=False)
class MapCacheRev:
    """One locked pointer handed out: the reverse map of ``locked_entries``."""

    vaddr_req: int
    paddr_index: int
    size: int
    dma: bool


@dataclass
class MapCacheStats:
    notifier_adds: int = 0
    notifier_removes: int = 0
    dummy_mappings: int = 0
    foreign_mappings: int = 0
    replacements: int = 0
    translations: int = 0


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _test_bit_size(phys_addr: int, size: int) -> int:
    """Bytes of whole pages spanned by [phys_addr, phys_addr + size); one page for size 0."""
    if not size:
        return XC_PAGE_SIZE
    return _round_up(size + (phys_addr & (XC_PAGE_SIZE - 1)), XC_PAGE_SIZE)


def _cache_size(offset: int, size: int) -> int:
    return _round_up(size + offset, MCACHE_BUCKET_SIZE) if size else MCACHE_BUCKET_SIZE


class MapCache:
    """The mapcache of one device model for guest ``domid``.

    ``in_migrate`` answers whether the runstate is INMIGRATE; ``phys_offset_to_gaddr`` is the
    translation callback, given only in compat mode (docs/qemu-physmap.md, 'The mapcache').
    """

    def __init__(
        self,
        fmem: ForeignMemoryLike,
        domid: int,
        in_migrate: Callable[[], bool],
        phys_offset_to_gaddr: PhysOffsetToGaddr | None = None,
        *,
        notifier: RamBlockNotifier | None = None,
        max_size: int = MCACHE_MAX_SIZE,
        trace: Callable[[str], None] | None = None,
        version: QemuVersion | None = None,
    ) -> None:
        self.version = version or QemuVersion()
        self._fmem = fmem
        self.domid = domid
        self._in_migrate = in_migrate
        self.phys_offset_to_gaddr = phys_offset_to_gaddr
        self._notifier = notifier
        self._trace = trace or (lambda _msg: None)
        self.nr_buckets = -(-max_size // MCACHE_BUCKET_SIZE)
        # The bucket array: chain lists, created on first touch; element 0 is the head entry.
        self._buckets: dict[int, list[MapCacheEntry]] = {}
        self.locked_entries: list[MapCacheRev] = []  # index 0 is the list head
        self.last_entry: MapCacheEntry | None = None
        self.stats = MapCacheStats()

    # ----------------------------------------------------------------------------------------
    # Public operations

    def map(self, phys_addr: int, size: int, *, lock: bool, dma: bool = False) -> int | None:
        """``xen_map_cache``: a host pointer to guest address ``phys_addr``, or None.

        cf. QEMU hw/xen/xen-mapcache.c: xen_map_cache_unlocked(): on a miss, compat mode tries
        again at the translated address, and during INMIGRATE with a dummy mapping.
        """
        translated = False
        dummy = False
        while True:
            index = phys_addr >> MCACHE_BUCKET_SHIFT
            offset = phys_addr & (MCACHE_BUCKET_SIZE - 1)
            test_size = _test_bit_size(phys_addr, size)
            first_page, npages = offset >> XC_PAGE_SHIFT, test_size >> XC_PAGE_SHIFT

            last = self.last_entry
            if (
                last is not None
                and last.paddr_index == index
                and not lock
                and not size
                and last.test_bits(first_page, npages)
            ):
                assert last.vaddr_base is not None
                return last.vaddr_base + offset

            cache_size = _cache_size(offset, size)
            entry = self._entry_for(index, cache_size, first_page, npages, lock, dummy)
            if not entry.test_bits(first_page, npages):
                self.last_entry = None
                if not translated and self.phys_offset_to_gaddr is not None:
                    phys_addr = self.phys_offset_to_gaddr(phys_addr, size)
                    translated = True
                    self.stats.translations += 1
                    continue
                if not dummy and self._in_migrate():
                    dummy = True
                    continue
                self._trace(f"xen_map_cache_return NULL for {phys_addr:#x}")
                return None

            self.last_entry = entry
            assert entry.vaddr_base is not None
            ptr = entry.vaddr_base + offset
            if lock:
                self._lock(entry, ptr, dma)
            return ptr

    def _entry_for(
        self, index: int, cache_size: int, first_page: int, npages: int, lock: bool, dummy: bool
    ) -> MapCacheEntry:
        """The chain's entry for these pages, (re)mapped if it needs to be: the first that
        maps them or may be remapped, else the first unlocked one, else a new one."""
        chain = self._chain(index)
        entry: MapCacheEntry | None = None
        free_entry: MapCacheEntry | None = None
        for candidate in chain:
            if (
                (lock or candidate.lock)
                and candidate.vaddr_base is not None
                and not (
                    candidate.paddr_index == index
                    and candidate.size == cache_size
                    and candidate.test_bits(first_page, npages)
                )
            ):
                if free_entry is None and not candidate.lock:
                    free_entry = candidate
                continue
            entry = candidate
            break
        if entry is None and free_entry is not None:
            entry = free_entry
        if entry is None:
            entry = MapCacheEntry()
            chain.append(entry)
            self._remap_bucket(entry, None, cache_size, index, dummy)
        elif not entry.lock and (
            entry.vaddr_base is None
            or entry.paddr_index != index
            or entry.size != cache_size
            or not entry.test_bits(first_page, npages)
        ):
            self._remap_bucket(entry, None, cache_size, index, dummy)
        return entry

    def _lock(self, entry: MapCacheEntry, ptr: int, dma: bool) -> None:
        """Count one more lock on ``entry`` and record ``ptr`` in the reverse map."""
        if not self.version.lock_aborts_on_overflow:
            entry.lock = (entry.lock + 1) & _LOCK_MASK_U8  # uint8_t: 256 locks are 0
        elif entry.lock >= _LOCK_MAX:
            raise QemuAbort("mapcache entry lock overflow")
        else:
            entry.lock += 1
        self.locked_entries.insert(0, MapCacheRev(ptr, entry.paddr_index, entry.size, dma))

    def replace_cache_entry(self, old_phys_addr: int, new_phys_addr: int, size: int) -> int | None:
        """``xen_replace_cache_entry`` (docs/qemu-physmap.md, 'The mapcache'): map ``new_phys_addr``
        over the entry of the old address at the same virtual address.  Returns the pointer, or
        None."""
        if not size:
            raise QemuAbort("xen_replace_cache_entry: Assertion `size' failed.")
        old_index = old_phys_addr >> MCACHE_BUCKET_SHIFT
        old_offset = old_phys_addr & (MCACHE_BUCKET_SIZE - 1)
        test_size = _test_bit_size(old_phys_addr, size)
        cache_size = _cache_size(old_offset, size)
        # Found by (old index, size) alone: neither the DUMMY flag nor the lock is checked.
        entry = self._find(old_index, cache_size)
        if entry is None or entry.vaddr_base is None:
            self._trace(f"xen_replace_cache_entry: no entry for {old_phys_addr:#x}")
            return None
        new_index = new_phys_addr >> MCACHE_BUCKET_SHIFT
        new_offset = new_phys_addr & (MCACHE_BUCKET_SIZE - 1)
        self._trace(
            f"Replacing a dummy mapcache entry for {old_phys_addr:#x} with {new_phys_addr:#x}"
        )
        self.stats.replacements += 1
        self._remap_bucket(entry, entry.vaddr_base, cache_size, new_index, False)
        if not entry.test_bits(new_offset >> XC_PAGE_SHIFT, test_size >> XC_PAGE_SHIFT):
            self._trace(f"xen_replace_cache_entry: could not update entry for {new_phys_addr:#x}")
            return None
        assert entry.vaddr_base is not None
        return entry.vaddr_base + new_offset

    def ram_addr_from_mapcache(self, ptr: int) -> int | None:
        """``xen_ram_addr_from_mapcache``: the guest address a locked pointer maps.

        QEMU 2.10 and 3.0 abort on a pointer that is not in the reverse map and answer 0 when
        its entry is gone; current QEMU answers RAM_ADDR_INVALID (None) for both.
        """
        rev = next((r for r in self.locked_entries if r.vaddr_req == ptr), None)
        aborts = self.version.ram_addr_lookup_aborts
        if rev is None:
            if aborts:
                raise QemuAbort(f"Trying to find address {ptr:#x} that is not in the mapcache!")
            return None
        entry = self._find(rev.paddr_index, rev.size)
        if entry is None or entry.vaddr_base is None:
            return 0 if aborts else None
        return (rev.paddr_index << MCACHE_BUCKET_SHIFT) + (ptr - entry.vaddr_base)

    def invalidate_entry(self, ptr: int) -> None:
        """``xen_invalidate_map_cache_entry``: drop one lock taken by :meth:`map`."""
        rev = next((r for r in self.locked_entries if r.vaddr_req == ptr), None)
        if rev is None:
            self._trace(f"invalidate_entry: {ptr:#x} was never locked")
            return
        self.locked_entries.remove(rev)
        if self.last_entry is not None and self.last_entry.paddr_index == rev.paddr_index:
            self.last_entry = None
        chain = self._buckets.get(rev.paddr_index % self.nr_buckets, [])
        pos = next(
            (
                i
                for i, e in enumerate(chain)
                if e.paddr_index == rev.paddr_index and e.size == rev.size
            ),
            None,
        )
        if pos is None:
            return
        entry = chain[pos]
        entry.lock -= 1
        if not self.version.lock_aborts_on_overflow:
            entry.lock &= _LOCK_MASK_U8
        # Head entries stay in the bucket array; only chained entries are freed at lock 0.
        if entry.lock > 0 or pos == 0:
            return
        del chain[pos]
        assert entry.vaddr_base is not None
        self._notify_removed(entry.vaddr_base, entry.size)
        self._unmap(entry)

    def invalidate(self) -> None:
        """``xen_invalidate_map_cache`` (IOREQ_TYPE_INVALIDATE): unmap every unlocked head entry.

        Locked entries such as the VRAM survive (docs/qemu-physmap.md, 'The mapcache', M6); chained
        entries are untouched; no notifier is called and the flags are kept.
        """
        for chain in self._buckets.values():
            head = chain[0]
            if head.vaddr_base is None or head.lock > 0:
                continue
            self._unmap(head)
            head.paddr_index = 0
            head.vaddr_base = None
            head.size = 0
            head.valid_mapping = 0
        self.last_entry = None

    def destroy(self) -> None:
        """Unmap everything (device-model exit): no mapping outlives the cache."""
        for chain in self._buckets.values():
            for entry in chain:
                if entry.vaddr_base is not None:
                    self._unmap(entry)
                    entry.vaddr_base = None
        self._buckets.clear()
        self.locked_entries.clear()
        self.last_entry = None

    # ----------------------------------------------------------------------------------------
    # Introspection

    def entries(self) -> Iterator[tuple[int, MapCacheEntry]]:
        """``(bucket, entry)`` for every mapped entry, chain order."""
        for bucket in sorted(self._buckets):
            for entry in self._buckets[bucket]:
                if entry.vaddr_base is not None:
                    yield bucket, entry

    def chain(self, bucket: int) -> list[MapCacheEntry]:
        """The chain of ``bucket`` (a copy; empty if never touched)."""
        return list(self._buckets.get(bucket, ()))

    def find_entry(self, paddr_index: int, size: int) -> MapCacheEntry | None:
        return self._find(paddr_index, size)

    def info(self) -> dict[str, object]:
        """The ``x-physmap-info`` view of the cache."""
        return {
            "bucket_shift": MCACHE_BUCKET_SHIFT,
            "entries": [
                {
                    "bucket": bucket,
                    "paddr_index": e.paddr_index,
                    "vaddr_base": e.vaddr_base,
                    "size": e.size,
                    "lock": e.lock,
                    "dummy": e.dummy,
                    "valid_pages": e.valid_mapping.bit_count(),
                }
                for bucket, e in self.entries()
            ],
            "locked_entries": len(self.locked_entries),
            "notifier_adds": self.stats.notifier_adds,
            "notifier_removes": self.stats.notifier_removes,
            "dummy_mappings": self.stats.dummy_mappings,
            "foreign_mappings": self.stats.foreign_mappings,
            "replacements": self.stats.replacements,
            "translations": self.stats.translations,
        }

    # ----------------------------------------------------------------------------------------
    # Internals

    def _chain(self, index: int) -> list[MapCacheEntry]:
        bucket = index % self.nr_buckets
        chain = self._buckets.get(bucket)
        if chain is None:
            chain = self._buckets[bucket] = [MapCacheEntry()]
        return chain

    def _find(self, paddr_index: int, size: int) -> MapCacheEntry | None:
        return next(
            (
                e
                for e in self._buckets.get(paddr_index % self.nr_buckets, ())
                if e.paddr_index == paddr_index and e.size == size
            ),
            None,
        )

    def _remap_bucket(
        self, entry: MapCacheEntry, vaddr: int | None, size: int, index: int, dummy: bool
    ) -> None:
        """``xen_remap_bucket`` (cf. hw/i386/xen/xen-mapcache.c).

        QEMU 2.10 and 3.0 always unmap the old mapping first and pass ``vaddr`` to
        ``xenforeignmemory_map2`` (or ``mmap`` for a dummy) as a placement hint with flags 0;
        whether the address is kept rests on the kernel honouring the hint, and
        ``xen_add_to_physmap`` asserts it.  Current QEMU maps over the old entry with
        MAP_FIXED and no unmap.
        """
        was_dummy = entry.dummy
        fixed = self.version.remap_map_fixed and vaddr is not None
        if entry.vaddr_base is not None:
            if not was_dummy:
                self._notify_removed(entry.vaddr_base, entry.size)
            if fixed and (entry.vaddr_base != vaddr or entry.size != size):
                raise QemuAbort("xen_remap_bucket: Assertion `!vaddr || ...' failed.")
            if not fixed:
                self._unmap(entry)
                entry.vaddr_base = None
        npages = size >> XC_PAGE_SHIFT
        first_pfn = index << (MCACHE_BUCKET_SHIFT - XC_PAGE_SHIFT)
        if not dummy:
            pfns = range(first_pfn, first_pfn + npages)
            flags = vma.MAP_FIXED if fixed else 0
            try:
                base, errs = self._fmem.map2(self.domid, vaddr, vma.PROT_RW, flags, pfns)
            except ForeignMemoryFailed as exc:
                raise QemuExit(f"xen_remap_bucket: xenforeignmemory_map2: {exc}", 255) from exc
            self.stats.foreign_mappings += 1
        else:
            mflags = vma.MAP_SHARED | vma.MAP_ANONYMOUS | (vma.MAP_FIXED if fixed else 0)
            try:
                base = vma.mmap_raw(vaddr, size, vma.PROT_RW, mflags, -1, 0)
            except OSError as exc:
                raise QemuExit(f"xen_remap_bucket: mmap: {exc}", 255) from exc
            errs = [0] * npages
            self.stats.dummy_mappings += 1
        if not was_dummy:
            self._notify_added(base, size)
        entry.vaddr_base = base
        entry.paddr_index = index
        entry.size = size
        if dummy:
            entry.flags |= XEN_MAPCACHE_ENTRY_DUMMY
        else:
            entry.flags &= ~XEN_MAPCACHE_ENTRY_DUMMY
        bits = 0
        for i, err in enumerate(errs):
            if not err:
                bits |= 1 << i
        entry.valid_mapping = bits

    def _unmap(self, entry: MapCacheEntry) -> None:
        assert entry.vaddr_base is not None
        if entry.dummy:
            vma.munmap(entry.vaddr_base, entry.size)
        else:
            self._fmem.unmap(entry.vaddr_base, entry.size >> XC_PAGE_SHIFT)

    def _notify_added(self, host: int, size: int) -> None:
        self.stats.notifier_adds += 1
        if self._notifier is not None:
            self._notifier.ram_block_added(host, size)

    def _notify_removed(self, host: int, size: int) -> None:
        self.stats.notifier_removes += 1
        if self._notifier is not None:
            self._notifier.ram_block_removed(host, size)


@dataclass
class RecordingNotifier:
    """A RAM-block notifier that records every call (for tests and ``x-physmap-info``)."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def ram_block_added(self, host: int, size: int) -> None:
        self.calls.append(("add", host, size))

    def ram_block_removed(self, host: int, size: int) -> None:
        self.calls.append(("remove", host, size))

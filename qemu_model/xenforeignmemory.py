"""What the device model needs of ``libxenforeignmemory``.

The library itself is :mod:`hypervisor_sim.xenforeignmemory`: real mmaps of a domain's frames,
with ``MAP_FIXED`` placing a mapping over an existing one atomically, which is how
``xen_replace_cache_entry`` swaps the dummy for the guest's frames (docs/qemu-physmap.md, 'The
mapcache'). Here the device model adds QEMU's view of a failure: a NULL from
``xenforeignmemory_map2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hypervisor_sim import xenforeignmemory
from hypervisor_sim.xenforeignmemory import ForeignMapper

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class ForeignMemoryFailed(Exception):
    """The whole mapping failed (``xenforeignmemory_map2`` returned NULL)."""


class ForeignMemoryLike(Protocol):
    """What the mapcache needs from ``libxenforeignmemory``."""

    def map2(
        self, domid: int, addr: int | None, prot: int, flags: int, pfns: Sequence[int]
    ) -> tuple[int, list[int]]: ...

    def unmap(self, vaddr: int, npages: int) -> None: ...


class ForeignMemory:
    """The library's handle, with a total failure reported as :class:`ForeignMemoryFailed`.

    ``errs`` holds 0 or a negative errno per page, as Linux privcmd reports them.
    """

    def __init__(self, mapper: ForeignMapper) -> None:
        self._lib = xenforeignmemory.ForeignMemory(mapper)

    def map2(
        self, domid: int, addr: int | None, prot: int, flags: int, pfns: Sequence[int]
    ) -> tuple[int, list[int]]:
        try:
            return self._lib.map2(domid, addr, prot, flags, pfns)
        except OSError as exc:
            raise ForeignMemoryFailed(f"map_foreign d{domid}: {exc}") from exc

    def unmap(self, vaddr: int, npages: int) -> None:
        self._lib.unmap(vaddr, npages)

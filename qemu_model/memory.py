"""RAM blocks and the ram_addr space (QEMU ``system/physmem.c`` under Xen).

Under Xen a RAM block owns no host memory: its ``ram_addr`` offset doubles as a guest frame
number range, and the first pointer use maps the whole block through the mapcache, locked, and
caches it in ``host`` (qemu-physmap.md §4.1, §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: QEMU's name for the main guest RAM block under Xen.
XEN_RAM_NAME: Final = "xen.ram"
_ALIGN: Final = 1 << 20


@dataclass(eq=False)
class RamBlock:
    name: str
    offset: int  # ram_addr_t: under Xen also gfn << 12 of the block's home
    max_length: int
    host: int | None = None  # block->host once mapped
    #: VGA dirty logging on the region (memory_region_set_log(mr, on, DIRTY_MEMORY_VGA)).
    log_dirty: bool = False


class RamList:
    """The ram_addr allocator: main RAM at 0, every further block after it, 1 MiB aligned."""

    def __init__(self, ram_size: int) -> None:
        self.blocks: list[RamBlock] = [RamBlock(XEN_RAM_NAME, 0, ram_size)]
        self._next = _align(ram_size)

    @property
    def main(self) -> RamBlock:
        return self.blocks[0]

    def add(self, name: str, size: int) -> RamBlock:
        block = RamBlock(name, self._next, size)
        self._next = _align(self._next + size)
        self.blocks.append(block)
        return block

    def by_name(self, name: str) -> RamBlock | None:
        return next((b for b in self.blocks if b.name == name), None)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN

"""The library shims QEMU compiles in for old Xen control libraries.

docs/qemu-physmap.md, 'XEN_COMPAT_PHYSMAP': when the libraries predate 4.10, ``XEN_COMPAT_PHYSMAP``
is defined and QEMU supplies an inline ``xenforeignmemory_map2`` that asserts a NULL address and
zero flags, plus a ``xentoolcore_restrict_all`` stub that fails with ENOTTY.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from .errors import CompatMap2Assertion
from .xenforeignmemory import ForeignMemoryLike


class CompatForeignMemory:
    """``xenforeignmemory_map2`` as the compat shim: only ``map`` semantics are available."""

    def __init__(self, inner: ForeignMemoryLike) -> None:
        self._inner = inner

    def map2(
        self, domid: int, addr: int | None, prot: int, flags: int, pfns: Sequence[int]
    ) -> tuple[int, list[int]]:
        if addr is not None or flags != 0:
            raise CompatMap2Assertion(
                "xenforeignmemory_map2: Assertion `addr == NULL && flags == 0' failed."
            )
        return self._inner.map2(domid, None, prot, 0, pfns)

    def unmap(self, vaddr: int, npages: int) -> None:
        self._inner.unmap(vaddr, npages)


def compat_restrict_all(domid: int) -> int:
    """The compat ``xentoolcore_restrict_all`` stub: always -1 with errno ENOTTY."""
    return -errno.ENOTTY

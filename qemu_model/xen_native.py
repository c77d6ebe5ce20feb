"""The library shims QEMU compiles in for old Xen control libraries.

qemu-physmap.md §6.1: when the libraries predate 4.10, ``XEN_COMPAT_PHYSMAP`` is defined and
QEMU supplies an inline ``xenforeignmemory_map2`` that asserts a NULL address and zero flags,
plus a ``xentoolcore_restrict_all`` stub that fails with ENOTTY.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from .errors import CompatMap2Assertion
from .version import QemuVersion
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


class RestrictableHandles(Protocol):
    """The library handles a device model can restrict; each call answers 0 or -errno."""

    def restrict_devicemodel(self, domid: int) -> int: ...

    def restrict_foreignmemory(self, domid: int) -> int: ...

    def restrict_all(self, domid: int) -> int: ...


def xen_restrict(
    version: QemuVersion, compat: bool, domid: int, handles: RestrictableHandles
) -> tuple[int, tuple[str, ...]]:
    """``xen_restrict`` (include/hw/xen/xen_common.h): (0 or -errno, the handles restricted).

    QEMU 2.10 restricts the devicemodel handle, then the foreignmemory handle; an ENOTTY from
    a library without restriction counts as success and restricts nothing more.  A compat
    build has only the stubs (ENOTTY), so it starts unrestricted, and its xc handle and
    xenstore connection stay open either way.  From QEMU 3.0 ``xentoolcore_restrict_all``
    restricts every handle and closes xenstore; the compat stub fails with ENOTTY.
    """
    if version.restrict_all:
        rc = compat_restrict_all(domid) if compat else handles.restrict_all(domid)
        return rc, () if rc < 0 else ("devicemodel", "foreignmemory", "xc", "xenstore")
    rc = -errno.ENOTTY if compat else handles.restrict_devicemodel(domid)
    if rc == -errno.ENOTTY:
        return 0, ()
    if rc < 0:
        return rc, ()
    rc = handles.restrict_foreignmemory(domid)
    return rc, ("devicemodel",) if rc < 0 else ("devicemodel", "foreignmemory")

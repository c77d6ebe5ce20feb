"""``xenforeignmemory``: map another domain's frames into this process.

The library layer over :class:`~hypervisor_sim.privcmd.Privcmd` and :mod:`hypervisor_sim.vma`,
with the semantics of Xen's ``xenforeignmemory_map2`` (tools/include/xenforeignmemory.h, Xen
4.10, qemu-physmap.md §0 and §3.5):

* ``addr`` is a placement hint, as for mmap(2); with ``MAP_FIXED`` in ``flags`` the mapping
  replaces whatever is at ``addr`` (the mapcache's in-place replacement of a dummy entry).
* With per-page errors the call still returns a valid address: ``errs[i]`` is 0 or a negative
  errno (``-EINVAL`` for an unpopulated gfn, as ``mod_l1_entry`` in xen/arch/x86/mm.c answers;
  ``-ENOENT`` would mean paged out).  As with Linux privcmd, touching a failed page raises
  SIGBUS: the range behind it is a shared mapping of an empty memfd, so every access is past
  the end of its file.
* A total failure (no such domain, a restricted privcmd naming another domain) raises
  :class:`OSError` with the errno, where the C function returns NULL.

Each run of frames that are consecutive in the domain's memory file is one ``mmap`` of that
file, so this process and the guest (and any other mapper) share the very same pages.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from . import vma
from .protocol import HypercallError

PAGE_SIZE = vma.PAGE_SIZE


def _errno(name: str) -> int:
    value = getattr(errno, name, None)
    return value if isinstance(value, int) else errno.EINVAL


class ForeignMapper(Protocol):
    """The one hypercall a foreign mapping needs: :class:`~hypervisor_sim.privcmd.Privcmd`."""

    def map_foreign(self, domid: int, gfns: list[int]) -> Mapping[str, Any]: ...


class ForeignMemory:
    """A ``xenforeignmemory_handle`` over a privcmd connection."""

    def __init__(self, privcmd: ForeignMapper) -> None:
        self.privcmd = privcmd

    def map2(
        self, domid: int, addr: int | None, prot: int, flags: int, pfns: Sequence[int]
    ) -> tuple[int, list[int]]:
        """Map ``pfns`` of ``domid`` contiguously; returns ``(vaddr, errs)``."""
        n = len(pfns)
        if n == 0:
            raise OSError(errno.EINVAL, "xenforeignmemory_map2: no pages")
        fixed = bool(flags & vma.MAP_FIXED)
        if fixed and addr is None:
            raise OSError(errno.EINVAL, "xenforeignmemory_map2: MAP_FIXED without an address")
        # As libxenforeignmemory: the range is mmap-ed first (placed at the hint), then the
        # frames are asked for (IOCTL_PRIVCMD_MMAPBATCH_V2).
        length = n * PAGE_SIZE
        base = self._map_faulting(addr, length, prot, flags)
        try:
            try:
                where = self.privcmd.map_foreign(domid, list(pfns))
            except HypercallError as exc:
                raise OSError(_errno(exc.errno_name), str(exc)) from None
            errs = self._map_runs(base, prot, where["mem_path"], where["offsets"], where["errors"])
        except OSError:
            vma.munmap(base, length)
            raise
        return base, errs

    @staticmethod
    def _map_faulting(addr: int | None, length: int, prot: int, flags: int) -> int:
        """The whole range as a mapping whose every access raises SIGBUS (an empty file)."""
        fd = os.memfd_create("privcmd-failed", os.MFD_CLOEXEC)
        try:
            base_flags = vma.MAP_SHARED | (flags & ~(vma.MAP_PRIVATE | vma.MAP_ANONYMOUS))
            return vma.mmap_raw(addr, length, prot, base_flags, fd, 0)
        finally:
            os.close(fd)

    def map(self, domid: int, prot: int, pfns: Sequence[int]) -> tuple[int, list[int]]:
        """``xenforeignmemory_map``: :meth:`map2` with no placement."""
        return self.map2(domid, None, prot, 0, pfns)

    @staticmethod
    def _map_runs(
        base: int, prot: int, path: str, offsets: Sequence[int], errors: Sequence[str]
    ) -> list[int]:
        errs = [
            0 if off >= 0 else -_errno(err or "EINVAL")
            for off, err in zip(offsets, errors, strict=True)
        ]
        mode = os.O_RDWR if prot & vma.PROT_WRITE else os.O_RDONLY
        fd = os.open(path, mode | os.O_CLOEXEC)
        try:
            i = 0
            while i < len(offsets):
                if offsets[i] < 0:
                    i += 1
                    continue
                j = i + 1
                while j < len(offsets) and offsets[j] == offsets[j - 1] + PAGE_SIZE:
                    j += 1
                vma.mmap_raw(
                    base + i * PAGE_SIZE,
                    (j - i) * PAGE_SIZE,
                    prot,
                    vma.MAP_SHARED | vma.MAP_FIXED,
                    fd,
                    offsets[i],
                )
                i = j
        finally:
            os.close(fd)
        return errs

    def unmap(self, vaddr: int, npages: int) -> None:
        """``xenforeignmemory_unmap``."""
        vma.munmap(vaddr, npages * PAGE_SIZE)

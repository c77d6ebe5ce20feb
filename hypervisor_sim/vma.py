"""Virtual memory areas through libc: the mmap calls behind a foreign mapping.

Python's :mod:`mmap` cannot place a mapping at a chosen address, and QEMU's mapcache needs
exactly that: ``xen_remap_bucket`` maps the real guest frames over the dummy with MAP_FIXED so
the virtual address devices hold stays valid (docs/qemu-physmap.md, 'The mapcache').  These helpers
call libc's ``mmap``/``munmap`` directly and hand out plain integer addresses.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Final

PAGE_SIZE: Final = mmap.PAGESIZE

PROT_READ: Final = mmap.PROT_READ
PROT_WRITE: Final = mmap.PROT_WRITE
PROT_RW: Final = PROT_READ | PROT_WRITE
MAP_SHARED: Final = mmap.MAP_SHARED
MAP_PRIVATE: Final = mmap.MAP_PRIVATE
MAP_ANONYMOUS: Final = mmap.MAP_ANONYMOUS
MAP_FIXED: Final = 0x10
MAP_NORESERVE: Final = 0x4000
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

# The running program's own symbols, libc's among them (dlopen(NULL)): no ldconfig run,
# which ctypes.util.find_library forks for, in every process that imports this.
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def mmap_raw(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """``mmap(2)``; returns the address or raises :class:`OSError` with the errno."""
    res = _mmap(addr, length, prot, flags, fd, offset)
    if res is None or res == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(res)


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")


def map_anonymous(length: int, addr: int | None = None) -> int:
    """A zero-filled shared anonymous mapping; with ``addr`` it replaces what is there."""
    flags = MAP_SHARED | MAP_ANONYMOUS | (MAP_FIXED if addr is not None else 0)
    return mmap_raw(addr, length, PROT_RW, flags, -1, 0)


def read(addr: int, length: int) -> bytes:
    """Copy ``length`` bytes from a mapped address."""
    return ctypes.string_at(addr, length)


def write(addr: int, data: bytes) -> None:
    """Copy ``data`` to a mapped address."""
    ctypes.memmove(addr, data, len(data))


def view(addr: int, length: int) -> memoryview:
    """A writable memoryview of mapped memory; valid only while the mapping lives."""
    buf = (ctypes.c_char * length).from_address(addr)
    return memoryview(buf).cast("B")

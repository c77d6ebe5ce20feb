"""A domain's machine frames: one sparse file, one 4 KiB page per frame.

The frame number (mfn) is the page index in ``RUNDIR/mem/dom<domid>.mem``; a foreign mapper
mmaps the file at ``mfn * PAGE_SIZE`` and so sees the very bytes the guest sees.  The file only
ever grows, so a mapping handed out earlier never points past its end.  Freed frames are zeroed
by punching a hole (``fallocate(FALLOC_FL_PUNCH_HOLE)``), which also returns the disk blocks, the
way Xen scrubs a page before it goes back to the heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02

# The running program's own symbols, libc's among them (dlopen(NULL)): no ldconfig run,
# which ctypes.util.find_library forks for, in every process that imports this.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class FrameFile:
    """The backing file of one domain's frames, with a free list of frame numbers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._nframes = 0  # frames the file holds (its size in pages)
        self._free: list[int] = []

    @property
    def nframes(self) -> int:
        return self._nframes

    def alloc(self) -> int:
        """A zeroed frame: a freed one if any (lowest first), else the file grows by one page."""
        return self.alloc_many(1)[0]

    def alloc_many(self, n: int) -> list[int]:
        """``n`` zeroed frames: freed ones first (lowest first), then new ones from a single
        growth of the file."""
        take = min(n, len(self._free))
        mfns = self._free[len(self._free) - take :][::-1]
        del self._free[len(self._free) - take :]
        grow = n - take
        if grow:
            first = self._nframes
            self._nframes += grow
            os.ftruncate(self._fd, self._nframes * PAGE_SIZE)
            mfns.extend(range(first, first + grow))
        return mfns

    def free(self, mfn: int) -> None:
        """Zero the frame and put it on the free list."""
        self.free_many([mfn])

    def free_many(self, mfns: list[int]) -> None:
        """Zero the frames and put them on the free list."""
        for mfn in mfns:
            self._zero(mfn)
        self._free.extend(mfns)
        # Reuse low frames first so that the file stays compact.
        self._free.sort(reverse=True)

    def _zero(self, mfn: int) -> None:
        off = mfn * PAGE_SIZE
        if _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, PAGE_SIZE):
            os.pwrite(self._fd, bytes(PAGE_SIZE), off)

    def read(self, mfn: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, mfn * PAGE_SIZE + offset)
        # A hole past a short read cannot happen (the file covers every frame), but be exact.
        return data.ljust(length, b"\0")

    def write(self, mfn: int, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, mfn * PAGE_SIZE + offset)

    def digests(self, mfns: list[int]) -> list[bytes]:
        """The SHA-1 of each frame, read through one shared read-only mapping of the file, so
        the bytes hashed are the ones every mapper sees (hypervisor_sim/logdirty.py)."""
        if not mfns or self._nframes == 0:
            return [b""] * len(mfns)
        with mmap.mmap(self._fd, self._nframes * PAGE_SIZE, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return [
                    hashlib.sha1(
                        view[f * PAGE_SIZE : (f + 1) * PAGE_SIZE], usedforsecurity=False
                    ).digest()
                    for f in mfns
                ]
            finally:
                view.release()

    def close(self, *, unlink: bool = True) -> None:
        """Close the file and (by default) remove it; existing mappings keep their pages."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

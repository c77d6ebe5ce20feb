"""Exact reads over a seekable binary file, with the offset in every error.

The stream parsers (:mod:`toolstack.stream`, :mod:`toolstack.memory_stream`) read through an
:class:`ImageReader` so that a truncated or overlong field is reported with where it happened,
and so that page contents can be skipped with a seek instead of being read.

Page contents move between files by descriptor and offset (:func:`copy_range`), with
``copy_file_range(2)``, so they never pass through Python buffers; :class:`DataRuns` tells which
parts of a sparse file hold data, so that holes (zero pages) need not be copied at all.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
from collections.abc import Iterator
from typing import BinaryIO, Final, cast

#: Page contents are copied in slices of this size when skipping a non-seekable source.
_SKIP_CHUNK: Final = 1 << 20


class StreamError(ValueError):
    """The image is malformed.  ``offset`` is where in the file the problem was found."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(f"{message} (at offset {offset})" if offset is not None else message)


class ImageReader:
    """Reads exactly what is asked from ``f`` or raises :class:`StreamError`."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.offset = f.tell() if f.seekable() else 0
        self.size: int | None = None
        if f.seekable():
            here = f.tell()
            self.size = f.seek(0, os.SEEK_END)
            f.seek(here)

    @property
    def file(self) -> BinaryIO:
        return self._f

    def remaining(self) -> int | None:
        return None if self.size is None else self.size - self.offset

    def need(self, n: int, what: str) -> None:
        """Fail early if fewer than ``n`` bytes are left for ``what``."""
        left = self.remaining()
        if left is not None and left < n:
            raise StreamError(
                f"truncated: {what} needs {n} bytes but only {left} remain", self.offset
            )

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise StreamError(f"truncated: {what} needs {n} bytes, got {len(data)}", self.offset)
        self.offset += n
        return data

    def readinto(self, view: memoryview, what: str) -> None:
        """Fill ``view`` completely from the file."""
        n = len(view)
        self.need(n, what)
        done = 0
        raw = cast(io.BufferedIOBase, self._f)
        while done < n:
            got = raw.readinto(view[done:])
            if not got:
                raise StreamError(f"truncated: {what} needs {n} bytes, got {done}", self.offset)
            done += got
        self.offset += n

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        if self._f.seekable():
            self._f.seek(n, os.SEEK_CUR)
        else:
            left = n
            while left:
                chunk = self._f.read(min(left, _SKIP_CHUNK))
                if not chunk:
                    raise StreamError(f"truncated: {what}", self.offset + n - left)
                left -= len(chunk)
        self.offset += n

    def seek(self, offset: int) -> None:
        self._f.seek(offset)
        self.offset = offset

    def at_eof(self) -> bool:
        if self.size is not None:
            return self.offset >= self.size
        # A non-seekable source is only asked at the very end: a byte here is trailing data.
        return not self._f.read(1)


# --------------------------------------------------------------------------------------------
# Copies between descriptors

#: errno values of a ``copy_file_range`` the kernel or file system cannot do for this pair.
_NO_COPY_FILE_RANGE: Final = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes from ``src`` at ``src_off`` to ``dst`` at ``dst_off`` inside the
    kernel (``copy_file_range``), falling back to ``pread``/``pwrite`` where it is refused.
    Neither file position moves.  Raises :class:`StreamError` if ``src`` ends first."""
    left = length
    while left:
        try:
            n = os.copy_file_range(src, dst, left, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            _copy_by_pread(src, src_off, dst, dst_off, left)
            return
        if n == 0:
            raise StreamError(f"truncated: {left} bytes missing", src_off)
        src_off += n
        dst_off += n
        left -= n


def _copy_by_pread(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    buf = bytearray(min(length, _SKIP_CHUNK))
    view = memoryview(buf)
    while length:
        got = os.preadv(src, [view[: min(length, len(buf))]], src_off)
        if not got:
            raise StreamError(f"truncated: {length} bytes missing", src_off)
        done = 0
        while done < got:
            done += os.pwrite(dst, view[done:got], dst_off + done)
        src_off += got
        dst_off += got
        length -= got


class DataRuns:
    """Where a file holds data rather than holes, from ``SEEK_DATA``/``SEEK_HOLE``.

    A hole reads as zeros, so a copy into a destination already known to be zero may skip it:
    :meth:`pieces` splits a byte range into its data-bearing parts.  A file system without
    hole reporting shows the whole file as data, which is always correct.
    """

    def __init__(self, fd: int, end: int | None = None) -> None:
        if end is None:
            end = os.fstat(fd).st_size
        self._starts: list[int] = []
        self._ends: list[int] = []
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after pos
                    break
                if exc.errno != errno.EINVAL:
                    raise
                data, hole = pos, end
            if data >= end:
                break
            self._starts.append(data)
            self._ends.append(min(hole, end))
            pos = hole
        self.size = end

    @classmethod
    def dense(cls, size: int) -> DataRuns:
        """Runs that call every byte data (copy everything)."""
        runs = cls.__new__(cls)
        runs._starts, runs._ends, runs.size = [0], [size], size
        return runs

    @property
    def data_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of each data-bearing part of ``[offset, offset + length)``."""
        end = offset + length
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self._starts) and self._starts[i] < end:
            lo = max(self._starts[i], offset)
            hi = min(self._ends[i], end)
            if hi > lo:
                yield lo, hi - lo
            i += 1

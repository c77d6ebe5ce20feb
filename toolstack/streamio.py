"""Exact reads over a seekable binary file, with the offset in every error.

The stream parsers (:mod:`toolstack.stream`, :mod:`toolstack.memory_stream`) read through an
:class:`ImageReader` so that a truncated or overlong field is reported with where it happened,
and so that page contents can be skipped with a seek instead of being read.
"""

from __future__ import annotations

import io
import os
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

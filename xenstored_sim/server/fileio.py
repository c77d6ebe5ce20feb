"""Every file operation of the durable store, through one door that can record them.

The durable store (:mod:`.durable`) and the daemon's group commit call these functions instead
of :mod:`os` directly, so that one place sees every ``open``, ``write``, ``ftruncate``,
``fsync``, ``fdatasync``, ``rename``, ``unlink`` and directory fsync the daemon does on its
state directory.  With ``$XENSTORED_SIM_FILEOPS_LOG`` set to a file name, each operation is
appended to that file as one JSON line *after* it has returned, in the order the daemon did
them.  The crash-state explorer (:mod:`xenstored_sim.core.crashfs` and
``tests/xenstored_sim/durability/test_crash_states.py``) rebuilds, from that record, the
states a power cut may leave on disk, the technique of ALICE (Pillai et al., OSDI 2014) and
CrashMonkey (Mohan et al., OSDI 2018).

Without the variable the functions are plain calls into :mod:`os`; with it, the log is
written with one ``write`` per line on an ``O_APPEND`` descriptor and is never fsynced (it
describes the run, it is not part of the state).
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Final

LOG_ENV: Final = "XENSTORED_SIM_FILEOPS_LOG"


class FileIO:
    """The file operations of one durable store; ``log_path`` records them (None: silent)."""

    def __init__(self, log_path: str | None = None) -> None:
        self._log = -1
        if log_path:
            self._log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @classmethod
    def from_environ(cls) -> FileIO:
        return cls(os.environ.get(LOG_ENV) or None)

    def _note(self, op: str, **fields: object) -> None:
        if self._log >= 0:
            line = json.dumps({"op": op, **fields}, separators=(",", ":")) + "\n"
            os.write(self._log, line.encode())

    # ----------------------------------------------------------------- descriptors

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        path = os.path.abspath(path)
        fd = os.open(path, flags, mode)
        if self._log >= 0:
            self._note(
                "open",
                path=path,
                fd=fd,
                creat=bool(flags & os.O_CREAT),
                trunc=bool(flags & os.O_TRUNC),
                append=bool(flags & os.O_APPEND),
            )
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)
        self._note("close", fd=fd)

    def write_all(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` at the file position (the end, for ``O_APPEND``)."""
        view = memoryview(data)
        while view:
            offset = self._offset(fd) if self._log >= 0 else 0
            n = os.write(fd, view)
            if self._log >= 0:
                self._note("write", fd=fd, off=offset, data=bytes(view[:n]).hex())
            view = view[n:]

    def _offset(self, fd: int) -> int:
        """Where the next write lands: the end for ``O_APPEND``, else the file position."""
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return os.fstat(fd).st_size
        return os.lseek(fd, 0, os.SEEK_CUR)

    def read_all(self, fd: int) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)
        self._note("ftruncate", fd=fd, size=size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._note("fsync", fd=fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)
        self._note("fdatasync", fd=fd)

    # ----------------------------------------------------------------- names

    def read_file(self, path: str) -> bytes | None:
        """The content of ``path``, or None if it does not exist."""
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def rename(self, src: str, dst: str) -> None:
        """``rename(2)``: atomically replaces ``dst``."""
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        os.replace(src, dst)
        self._note("rename", src=src, dst=dst)

    def unlink(self, path: str) -> bool:
        """Remove ``path``; False if it was not there."""
        path = os.path.abspath(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        self._note("unlink", path=path)
        return True

    def mkdirs(self, path: str) -> None:
        """Create ``path`` and missing parents; each new directory's entry is fsynced in its
        parent, so the directory itself survives a machine crash."""
        path = os.path.abspath(path)
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        self.mkdirs(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        self._note("mkdir", path=path)
        self.fsync_dir(parent)

    def fsync_dir(self, path: str) -> None:
        """fsync a directory: its entries (creations, renames, unlinks) become durable."""
        path = os.path.abspath(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._note("fsync_dir", path=path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

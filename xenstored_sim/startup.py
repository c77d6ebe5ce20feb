"""What every daemon of the stack does at start-up: bind its socket safely (and remove only
its own at exit), and report a start-up failure in one line.

Every daemon of the stack (xenstored-sim, hypervisor-sim, qemu-model) serves a socket at a
fixed path in the run directory.  C xenstored unlinks the path and binds (xenstored_posix.c:
``init_sockets``), which lets a second daemon silently take the socket of a live first one.
Here a path is only replaced when nobody answers on it (a socket left by a killed daemon);
when a live process answers, binding fails with :class:`SocketInUse`, naming the path and,
from ``SO_PEERCRED``, the pid.  At exit a daemon removes the path only if it still names the
socket file it created itself (same device and inode), never a successor's.

Blocking stdlib only: the trio shells wrap the returned socket.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Final, NoReturn

_UCRED: Final = struct.Struct("3i")
#: Bytes of a Unix socket path, without the NUL (struct sockaddr_un sun_path[108]).
_SUN_PATH_MAX: Final = 107


class SocketInUse(OSError):
    """A live process already answers on the path."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(errno.EADDRINUSE, f"{path} is in use: {who} answers on it")
        self.path = path
        self.pid = pid


def peer_pid(sock: socket.socket) -> int | None:
    """The pid at the other end of a connected Unix socket (``SO_PEERCRED``)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid: int = _UCRED.unpack(raw)[0]
    return pid or None


def check_length(path: str) -> None:
    """Refuse a path too long for ``sun_path`` with an error that says so."""
    size = len(os.fsencode(path))
    if size > _SUN_PATH_MAX:
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot use {path}: a Unix socket path holds at most {_SUN_PATH_MAX} bytes"
            f" (sun_path), this one has {size}; choose a shorter run directory",
        )


def answering_pid(path: str) -> int | None:
    """Raise :class:`SocketInUse` if a live process answers on ``path``.

    Returns ``None`` when nobody does (no such path, or a stale socket file).
    """
    check_length(path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except BlockingIOError:
            # A full backlog: somebody is listening but busy.
            raise SocketInUse(path, None) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
                return None
            raise OSError(exc.errno, f"cannot probe {path}: {exc.strerror or exc}") from None
        raise SocketInUse(path, peer_pid(probe))
    finally:
        probe.close()


@dataclass
class OwnedSocket:
    """A listening socket and the identity of the file this process bound it to.

    A duplicate of the descriptor is held until :meth:`remove`: while the socket lives, its
    file's inode cannot be freed and its number reused by a successor's socket, so the
    (device, inode) check is sound even after the daemon closed its listener.
    """

    sock: socket.socket
    path: str
    dev: int
    ino: int
    hold: int = -1

    def __post_init__(self) -> None:
        if self.hold < 0:
            self.hold = os.dup(self.sock.fileno())

    @classmethod
    def adopt(cls, sock: socket.socket, path: str) -> OwnedSocket:
        """A listener handed over by a predecessor (a live update): the file at ``path``
        now is the one to remove at exit."""
        st = os.lstat(path)
        return cls(sock, path, st.st_dev, st.st_ino)

    def is_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def remove(self) -> None:
        """Unlink the path if it still names the socket file created here."""
        if self.is_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.hold >= 0:
            os.close(self.hold)
            self.hold = -1


#: The longest path a ``sockaddr_un`` holds (``sun_path`` is 108 bytes with its NUL).


def listen_unix(path: str, *, backlog: int = 128, mode: int = 0o600) -> OwnedSocket:
    """Bind and listen on ``path`` unless a live process answers there.

    The socket is bound under a temporary name with a umask that leaves no window with wider
    permissions, made to listen, then renamed onto ``path``: whoever sees the path can connect
    at once.  A stale socket file at ``path`` is replaced; anything that is not a socket is an
    error.  Errors are :class:`OSError` whose message names the path.
    """
    check_length(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot use {path}: {exc.strerror or exc}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    answering_pid(path)
    directory = os.path.dirname(path)
    # A short temporary name: an AF_UNIX path holds at most 107 bytes (sun_path), and one that
    # fits only as the final name is bound there directly.
    tmp = os.path.join(directory, f".{os.getpid():x}~")
    if len(os.fsencode(tmp)) > _SUN_PATH_MAX >= len(os.fsencode(path)):
        tmp = path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(tmp)
        sock.listen(backlog)
        # A rival started at the same moment: whoever renames second checks once more.
        answering_pid(path)
        if tmp != path:
            os.rename(tmp, path)
        st = os.lstat(path)
    except BaseException as exc:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, SocketInUse):
            why = exc.strerror or str(exc)
            raise OSError(exc.errno, f"cannot listen on {path}: {why}") from None
        raise
    finally:
        os.umask(old)
    sock.setblocking(False)
    return OwnedSocket(sock, path, st.st_dev, st.st_ino)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) nursery groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def one_line(exc: BaseException) -> str:
    """An OSError as one line: its message, with the file it concerns if it has one."""
    if not isinstance(exc, OSError) or not exc.strerror:
        return str(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return exc.strerror


def os_errors(exc: BaseException) -> list[str] | None:
    """One line per failure if ``exc`` is (a group of) only OSErrors, else ``None``."""
    found = leaves(exc)
    if all(isinstance(leaf, OSError) for leaf in found):
        return [one_line(leaf) for leaf in found]
    return None


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``PROG: error: ...``, status 2;
    ``--help`` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

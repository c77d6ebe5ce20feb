"""The daemons' readiness handshake: one "ready" line, and ``--ready-fd N``.

A daemon is ready once its sockets accept.  It then prints one line such as
``xenstored-sim: ready on RUNDIR/socket (pid N)`` on stderr, with its other messages (stdout
stays C xenstored's: ``-P`` prints the pid there alone), and, given ``--ready-fd N``, writes
the same line to file descriptor N and closes it, so that a parent that passed one end of a
pipe reads a line when the daemon is ready, or end of file if it died first.  This is the
role ``sd_notify(1, "READY=1")`` plays for C xenstored under systemd (cf. Xen
tools/xenstored/posix.c).  The daemons of every package share it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence


def ready_fd(text: str) -> int:
    """argparse type for ``--ready-fd``: an open file descriptor other than 0-2."""
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if fd < 3:
        raise argparse.ArgumentTypeError(f"{fd} is stdin, stdout or stderr; give a pipe's fd")
    try:
        os.fstat(fd)
    except OSError:
        raise argparse.ArgumentTypeError(f"file descriptor {fd} is not open") from None
    return fd


def add_ready_fd_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready-fd",
        type=ready_fd,
        metavar="N",
        help="when ready, write the ready line to file descriptor N and close it",
    )


def ready_fd_from(argv: Sequence[str] | None) -> int | None:
    """``--ready-fd`` out of a daemon's arguments, which its own parser has already checked."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_ready_fd_argument(p)
    fd: int | None = p.parse_known_args(argv)[0].ready_fd
    return fd


def notify_ready(prog: str, where: str, fd: int | None) -> str:
    """Announce readiness: the ready line on stderr and on ``fd``; returns the line."""
    line = f"{prog}: ready on {where} (pid {os.getpid()})"
    with contextlib.suppress(OSError):  # stderr closed: a courtesy; the fd is the contract
        print(line, file=sys.stderr, flush=True)
    if fd is not None:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass  # the parent went away; it no longer waits
        finally:
            os.close(fd)
    return line

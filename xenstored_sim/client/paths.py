"""Where the daemon's socket is, found the way libxenstore finds it."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "DEFAULT_RUNDIR",
    "add_principal_socket_argument",
    "default_socket_path",
    "parse_principal_sockets",
]

#: ``XEN_RUN_STORED`` of a default Xen build.
DEFAULT_RUNDIR: Final = "/var/run/xenstored"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The xenstored socket path: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``,
    else ``/var/run/xenstored/socket`` (docs/xenstore.md, 'Socket location', Xen ``xs_lib.c``).

    An empty variable counts as unset.  ``environ`` defaults to :data:`os.environ`.
    """
    env = os.environ if environ is None else environ
    path = env.get("XENSTORED_PATH")
    if path:
        return path
    rundir = env.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    return os.path.join(rundir, "socket")


_PRINCIPAL: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")


def add_principal_socket_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--principal-socket NAME=PATH`` option both daemons take; ``what`` names the
    socket ("privileged socket", "hypercall socket")."""
    parser.add_argument(
        "--principal-socket",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"a further {what} for one principal (toolstack, device-model, ...); "
        "the audit log names NAME for its connections (repeatable)",
    )


def parse_principal_sockets(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=PATH`` specs of per-principal sockets (``--principal-socket`` of both daemons).

    Raises :class:`ValueError` naming the bad spec: a name that is not lower-case letters,
    digits and dashes, an empty path, or a name or path given twice.
    """
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not _PRINCIPAL.fullmatch(name) or not path:
            raise ValueError(f"--principal-socket {spec!r}: expected NAME=PATH, NAME in [a-z0-9-]")
        if any(name == n or path == p for n, p in out):
            raise ValueError(f"--principal-socket {spec!r}: name or path given twice")
        out.append((name, path))
    return tuple(out)

"""Where the daemon's socket is, found the way libxenstore finds it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = ["DEFAULT_RUNDIR", "default_socket_path"]

#: ``XEN_RUN_STORED`` of a default Xen build.
DEFAULT_RUNDIR: Final = "/var/run/xenstored"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The xenstored socket path: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``,
    else ``/var/run/xenstored/socket`` (xenstore-facts.md §1.15, Xen ``xs_lib.c``).

    An empty variable counts as unset.  ``environ`` defaults to :data:`os.environ`.
    """
    env = os.environ if environ is None else environ
    path = env.get("XENSTORED_PATH")
    if path:
        return path
    rundir = env.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    return os.path.join(rundir, "socket")

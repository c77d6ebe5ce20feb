"""Who is on the other end of a Unix socket (architecture.md, "Principals in the audit logs")."""

from __future__ import annotations

import socket
import struct
from typing import Any

_UCRED = struct.Struct("3i")


def peer_of(sock: socket.socket) -> dict[str, Any]:
    """``SO_PEERCRED`` pid and uid of the peer, and its command line from ``/proc``."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return {"pid": None, "uid": None, "cmdline": []}
    pid, uid, _gid = _UCRED.unpack(raw)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            blob = f.read()
        cmdline = [part.decode("utf-8", "replace") for part in blob.split(b"\0") if part]
    except OSError:
        cmdline = []
    return {"pid": pid, "uid": uid, "cmdline": cmdline}

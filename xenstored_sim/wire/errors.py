"""Exceptions of the wire layer, named for whose fault they are (as in h11)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of framing errors."""


class LocalProtocolError(ProtocolError):
    """Our caller tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must be closed.

    xenstore.txt: a message longer than XENSTORE_PAYLOAD_MAX kills the connection.
    """


class XsError(Exception):
    """An ERROR reply from the daemon, carrying the errno name (``"ENOENT"``...)."""

    def __init__(self, errno_name: str, op: str | None = None, path: str | None = None) -> None:
        self.errno_name = errno_name
        self.op = op
        self.path = path
        where = " ".join(p for p in (op, path) if p)
        super().__init__(f"{errno_name}: {where}" if where else errno_name)

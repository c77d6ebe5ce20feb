"""The ``-vnc`` display argument of the device model (cf. QEMU ui/vnc.c:
``vnc_display_open``), apart from the server so that a device model without VNC does not load
the server and its RFB codec at start-up.

``HOST:N`` or ``:N`` listens on TCP port 5900+N, ``unix:PATH`` on a unix socket, ``none`` not
at all; ``,to=L`` tries displays N to L until one is free (what libxl adds for ``vncunused``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Final

VNC_PORT_BASE: Final = 5900


class VncConfigError(ValueError):
    """A ``--vnc`` argument QEMU would refuse."""


@dataclass(frozen=True, slots=True)
class VncAddress:
    """Where to listen: a unix socket path, or a host and displays ``display``..``to``."""

    host: str | None = None
    display: int = 0
    to: int | None = None
    unix: str | None = None

    @property
    def port(self) -> int:
        return VNC_PORT_BASE + self.display

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        return f"{host}:{self.display}" + (f",to={self.to}" if self.to is not None else "")


def parse_vnc(arg: str) -> VncAddress | None:
    """A ``-vnc`` argument; None for ``none``.  :class:`VncConfigError` says what is wrong."""
    main, *opts = arg.split(",")
    to: int | None = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key != "to":
            raise VncConfigError(f"vnc: unsupported option {opt!r} (only to=L is modelled)")
        to = _number(value, "to")
    if main == "none":
        return None
    if main.startswith("unix:"):
        path = main[5:]
        if not path:
            raise VncConfigError("vnc: unix: needs a socket path")
        return VncAddress(unix=path)
    host, sep, display = main.rpartition(":")
    if not sep:
        raise VncConfigError(f"vnc: {arg!r} is not HOST:DISPLAY, :DISPLAY, unix:PATH or none")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    n = _number(display, "display")
    last = n if to is None else to
    if last < n or VNC_PORT_BASE + last > 65535:
        raise VncConfigError(f"vnc: display {n}..{last} does not give TCP ports up to 65535")
    return VncAddress(host=host or None, display=n, to=to)


def _number(text: str, what: str) -> int:
    if not text.isdigit():
        raise VncConfigError(f"vnc: {what} {text!r} is not a number")
    return int(text)


def unlink_unix(addr: VncAddress | None) -> None:
    if addr is not None and addr.unix is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr.unix)

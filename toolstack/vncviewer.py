"""``xl vncviewer DOMAIN``: find a domain's VNC server and start a viewer on it.

libxl reads the address from xenstore and execs ``$VNCVIEWER`` (default ``vncviewer``) with
``HOST:DISPLAY`` (cf. Xen tools/libs/light/libxl_console.c: libxl_vncviewer_exec()).  Here the
device model is asked with QMP ``query-vnc``, which names the address it really bound.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from .libxl import Libxl, ToolstackError
from .qmp import QmpError, QmpProtocolError, open_qmp

#: VNC display N listens on TCP port 5900+N.
VNC_BASE_PORT = 5900


async def address(lx: Libxl, domid: int) -> dict[str, Any]:
    """Where domain ``domid``'s VNC server listens, and the viewer command for it."""
    await lx.domain_info(domid)
    try:
        async with open_qmp(lx.run.qmp(domid)) as q:
            info = await q.execute("query-vnc")
    except (QmpError, QmpProtocolError, OSError) as exc:
        raise ToolstackError(f"cannot ask domain {domid}'s device model: {exc}") from None
    if not isinstance(info, dict) or not info.get("enabled"):
        raise ToolstackError(f"domain {domid} has no VNC server (set vnc = 1 in its xl.cfg)")
    host, service, family = info.get("host"), info.get("service"), info.get("family")
    if family == "unix":
        target = f"unix:{host}"
        display = None
    else:
        port = int(str(service))
        display = port - VNC_BASE_PORT
        target = f"[{host}]:{port}" if family == "ipv6" else f"{host}:{port}"
    viewer = os.environ.get("VNCVIEWER", "vncviewer")
    argv: list[str] | None = None
    if display is not None and shutil.which(viewer):
        # vncviewer's HOST:N is display N; a port outside 5900.. needs HOST::PORT.
        arg = f"{host}:{display}" if display >= 0 else f"{host}::{port}"
        argv = [viewer, arg]
    return {"domid": domid, "address": target, "display": display, "family": family, "viewer": argv}


def describe(out: dict[str, Any]) -> str:
    line = f"{out['address']}"
    if out["display"] is not None and out["display"] >= 0:
        line += f" (display {out['display']})"
    return line


def exec_viewer(out: dict[str, Any]) -> None:
    """Replace this process with the viewer, as xl does; returns if there is none."""
    argv = out.get("viewer")
    if argv:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise ToolstackError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

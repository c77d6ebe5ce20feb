"""The VNC server of the device model: the trio shell around :mod:`.rfb` (cf. QEMU ui/vnc.c).

``qemu-model --vnc ADDR`` takes QEMU's ``-vnc`` display syntax (``vnc_display_open``):
``HOST:N`` or ``:N`` listens on TCP port 5900+N (``:N`` on every address, as QEMU does with
an empty host), ``unix:PATH`` on a unix socket, ``none`` not at all; ``,to=L`` tries displays
N to L until one is free, the option libxl adds for ``vncunused``.

Each client gets what its FramebufferUpdateRequests ask for.  The server reads the surface
the device shows (:func:`.console.device_surface`, under the device model's lock), asks its
:class:`.dirty.DirtyRegionSource` what changed since the frame that client last got, and
sends those rectangles; a non-incremental request adds the requested area.  A mode change
answers a request with the DesktopSize pseudo-rectangle alone; the next one gets every pixel.  While nothing
changes it polls on QEMU's refresh schedule (``VNC_REFRESH_INTERVAL_BASE`` 30 ms, growing by
50 ms to 3 s, back to 30 ms on input).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from . import rfb
from .console import Surface
from .dirty import DirtyRegionSource, FrameDiff
from .vnc_display import VNC_PORT_BASE, VncAddress

log = logging.getLogger("qemu_model.vnc")

REFRESH_BASE_S: Final = 0.030
REFRESH_INC_S: Final = 0.050
REFRESH_MAX_S: Final = 3.0

Snapshot = Callable[[], Awaitable[Surface]]


async def open_vnc_listener(addr: VncAddress) -> tuple[trio.SocketListener, VncAddress]:
    """Bind and listen; returns the listener and the address it got (the display, with
    ``to=``).  :class:`OSError` names the address when nothing could be bound."""
    if addr.unix is not None:
        path = Path(addr.unix)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"Failed to bind socket for {addr}: {exc.strerror or exc}"
            ) from None
        return trio.SocketListener(sock), addr
    last = addr.display if addr.to is None else addr.to
    err: OSError | None = None
    for display in range(addr.display, last + 1):
        try:
            listeners = await trio.open_tcp_listeners(VNC_PORT_BASE + display, host=addr.host)
        except OSError as exc:
            err = exc
            continue
        # One listener per address family; the first is enough for a loopback or wildcard.
        for extra in listeners[1:]:
            await extra.aclose()
        return listeners[0], VncAddress(addr.host, display, addr.to)
    assert err is not None
    raise OSError(err.errno, f"Failed to bind socket for {addr}: {err.strerror or err}")


@dataclass
class _Client:
    codec: rfb.RfbServer
    stream: trio.abc.Stream
    last_sent: Surface | None = None
    pending: bool = False
    forced: list[rfb.Rect] = field(default_factory=list)
    wake: trio.Event = field(default_factory=trio.Event)
    interval: float = REFRESH_BASE_S


class VncServer:
    """Serves the surface ``snapshot`` returns to every client of a listener."""

    def __init__(
        self, name: str, snapshot: Snapshot, dirty: DirtyRegionSource | None = None
    ) -> None:
        self.name = name
        self.snapshot = snapshot
        self.dirty: DirtyRegionSource = dirty or FrameDiff()
        self.listener_info: dict[str, Any] = {}
        self.clients: dict[int, dict[str, Any]] = {}

    def info(self) -> dict[str, Any]:
        """QMP ``query-vnc`` (qapi/ui.json ``VncInfo``): the server and its clients."""
        return {
            "enabled": True,
            **self.listener_info,
            "auth": "none",
            "clients": list(self.clients.values()),
        }

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.listener_info = _basic_info(listener.socket.getsockname(), listener.socket.family)
        task_status.started()
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        info = _basic_info(stream.socket.getpeername(), stream.socket.family)
        peer = f"{info['host']}:{info['service']}" if info["service"] else "unix"
        client = _Client(rfb.RfbServer(self.name), stream)
        self.clients[id(client)] = {**info, "websocket": False}
        try:
            async with stream:
                await self._converse(client)
        except* rfb.RfbError as group:
            log.warning("vnc: client %s: %s; closing", peer, _first(group))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except* Exception as group:  # a bug must cost this client only, never the device model
            log.error("vnc: client %s: internal error: %r; closing", peer, _first(group))
        finally:
            del self.clients[id(client)]

    async def _converse(self, client: _Client) -> None:
        codec, stream = client.codec, client.stream
        await stream.send_all(codec.data_to_send())
        async with trio.open_nursery() as nursery:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                codec.receive_data(data)
                try:
                    while (event := codec.next_event()) is not None:
                        await self._event(client, event, nursery)
                finally:
                    out = codec.data_to_send()
                    if out:  # the handshake's replies, or a security failure's reason
                        await stream.send_all(out)

    async def _event(self, client: _Client, event: rfb.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, rfb.ClientInit):
            surface = await self.snapshot()
            client.codec.server_init(surface.width, surface.height)
            await client.stream.send_all(client.codec.data_to_send())
            nursery.start_soon(self._updater, client)
        elif isinstance(event, rfb.FramebufferUpdateRequest):
            client.pending = True
            if not event.incremental:
                client.forced.append(event.rect)
            client.wake.set()
        elif isinstance(event, rfb.SetPixelFormat):
            client.last_sent = None  # every pixel must go out again in the new format
        elif isinstance(event, rfb.KeyEvent | rfb.PointerEvent):
            # No keyboard or mouse is modelled: input is accepted and dropped, and, as in
            # QEMU, it brings the refresh back to its fastest rate.
            client.interval = REFRESH_BASE_S
            client.wake.set()

    async def _updater(self, client: _Client) -> None:
        while True:
            if not client.pending:
                await client.wake.wait()
                client.wake = trio.Event()
                continue
            if await self._update(client):
                client.interval = REFRESH_BASE_S
                continue
            with trio.move_on_after(client.interval):
                await client.wake.wait()
            client.wake = trio.Event()
            client.interval = min(client.interval + REFRESH_INC_S, REFRESH_MAX_S)

    async def _update(self, client: _Client) -> bool:
        """Answer the pending request with what changed (and what was asked for); False when
        there was nothing to send."""
        codec = client.codec
        surface = await self.snapshot()
        if (surface.width, surface.height) != (codec.width, codec.height) and codec.desktop_size:
            # The resize answers this request alone; the client asks again for the pixels,
            # all of which it must now get (cf. ``vnc_desktop_resize``).
            client.pending, client.forced, client.last_sent = False, [], None
            await client.stream.send_all(codec.desktop_resize(surface.width, surface.height))
            return True
        rects = _drop_covered(self.dirty.dirty_rects(client.last_sent, surface) + client.forced)
        client.forced = []
        if not rects:
            return False
        client.pending = False
        client.last_sent = surface
        await client.stream.send_all(codec.framebuffer_update(surface, rects))
        return True


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _drop_covered(rects: list[rfb.Rect]) -> list[rfb.Rect]:
    """``rects`` without those another one (earlier, if equal) already covers."""
    kept: list[rfb.Rect] = []
    for i, r in enumerate(rects):
        if not any(_covers(o, r) and (o != r or j < i) for j, o in enumerate(rects) if j != i):
            kept.append(r)
    return kept


def _covers(o: rfb.Rect, r: rfb.Rect) -> bool:
    return o.x <= r.x and o.y <= r.y and o.x + o.w >= r.x + r.w and o.y + o.h >= r.y + r.h


def _basic_info(name: Any, family: int) -> dict[str, Any]:
    """``VncBasicInfo``: host, service and family of a socket address."""
    if family == socket.AF_UNIX:
        return {"host": str(name), "service": "", "family": "unix"}
    host, port = name[0], name[1]
    return {
        "host": host,
        "service": str(port),
        "family": "ipv6" if family == socket.AF_INET6 else "ipv4",
    }

"""The QMP monitor: the device model's control socket and its sessions.

cf. QEMU monitor/qmp.c (monitor_qmp_read(), monitor_qmp_dispatch(), monitor_qapi_event_emit())
and qapi/qmp-dispatch.c: each client is greeted, negotiates capabilities in its
:class:`~qemu_model.qmp.QmpSession`, and sends one command per line; the monitor runs it
through the device model's command table and answers on the same connection.  Events go to
every negotiated client; one that does not read loses events rather than blocking the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from xenstored_sim.startup import OwnedSocket, listen_unix

from . import qmp
from .errors import QemuAbort, QemuExit

log = logging.getLogger("qemu_model")

#: Events a slow QMP client may have queued before it starts losing them.
QMP_EVENT_BUFFER = 256


class _QmpClient:
    def __init__(self) -> None:
        self.session = qmp.QmpSession()
        self.send, self.recv = trio.open_memory_channel[bytes](QMP_EVENT_BUFFER)


class QmpMonitor:
    """The QMP socket at ``path``: ``execute`` runs each command; ``quit`` is set once the
    ``quit`` command has been answered."""

    def __init__(
        self, path: Path, execute: Callable[[qmp.Command], Awaitable[Any]], quit: trio.Event
    ) -> None:
        self._path = path
        self._execute = execute
        self._quit = quit
        self._clients: set[_QmpClient] = set()
        self._sock: OwnedSocket | None = None

    def remove(self) -> None:
        """Remove the socket, if this monitor bound it."""
        if self._sock is not None:
            self._sock.remove()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QemuExit(f"cannot create {path.parent}: {exc.strerror}") from None
        # Bound under a temporary name and renamed: whoever sees the path can connect at once.
        # A live device model's socket is never replaced, and only our own is removed at exit.
        try:
            self._sock = listen_unix(str(path), backlog=16)
        except OSError as exc:
            raise QemuExit(f"QMP: {exc.strerror}") from None
        sock = trio.socket.from_stdlib_socket(self._sock.sock)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        client = _QmpClient()
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, stream, client)
            self._clients.add(client)
            try:
                client.send.send_nowait(qmp.encode(qmp.greeting()))
                buf = bytearray()
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not data:
                        break
                    buf += data
                    while (nl := buf.find(b"\n")) >= 0:
                        line = bytes(buf[:nl])
                        del buf[: nl + 1]
                        await self._line(client, line)
                    if len(buf) > qmp.MAX_LINE:
                        buf.clear()
                        await client.send.send(qmp.encode(qmp.error_reply("QMP input too long")))
            finally:
                self._clients.discard(client)
                client.send.close()

    async def _writer(self, stream: trio.SocketStream, client: _QmpClient) -> None:
        async for message in client.recv:
            try:
                await stream.send_all(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _line(self, client: _QmpClient, line: bytes) -> None:
        got = client.session.receive_line(line)
        if got is None:
            return
        if isinstance(got, dict):
            await client.send.send(qmp.encode(got))
            return
        try:
            result = await self._execute(got)
            reply = qmp.success_reply(got, result)
        except qmp.QmpError as exc:
            reply = qmp.error_reply(exc.desc, exc.error_class, cmd=got)
        except (QemuAbort, QemuExit):
            raise
        except Exception as exc:  # a bug must not take the device model down with it
            log.exception("QMP %s failed", got.name)
            reply = qmp.error_reply(f"{got.name}: internal error: {exc}", cmd=got)
        await client.send.send(qmp.encode(reply))
        if got.name == "quit":
            self.broadcast(qmp.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
            self._quit.set()

    def broadcast(self, message: dict[str, Any]) -> None:
        data = qmp.encode(message)
        for client in list(self._clients):
            if client.session.negotiated:
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    client.send.send_nowait(data)

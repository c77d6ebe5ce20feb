"""A QMP client, the toolstack's side of the device model's control socket (the role of
libxl's ``libxl_qmp.c``).

QMP is one JSON object per line: the server greets with ``{"QMP": {...}}``, the client enters
command mode with ``qmp_capabilities``, then each ``{"execute", "arguments", "id"}`` gets a
``{"return", "id"}`` or ``{"error": {"class", "desc"}, "id"}``.  Events (``{"event": ...}``)
may arrive at any time and are set aside.

:class:`QmpParser` is the sans-IO part; :func:`open_qmp` the trio shell.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

# The device model raises the same class to refuse a command (xenhost/qmp.py).
from xenhost.qmp import QmpError as QmpError

#: A line longer than this is not QMP (QEMU's own monitor limits input far lower).
MAX_LINE: Final = 16 * 1024 * 1024


class QmpProtocolError(Exception):
    """The peer does not speak QMP, or the connection went away."""


class QmpParser:
    """Split received bytes into JSON messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
            raise QmpProtocolError(f"QMP line over {MAX_LINE} bytes")

    def next_message(self) -> dict[str, Any] | None:
        """The next whole message, or ``None`` until more data arrives."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return None
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise QmpProtocolError(f"QMP sent a line that is not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise QmpProtocolError(f"QMP sent a {type(obj).__name__}, not an object")
            return obj


def command(name: str, arguments: Mapping[str, Any] | None, id: int) -> bytes:
    msg: dict[str, Any] = {"execute": name, "id": id}
    if arguments:
        msg["arguments"] = dict(arguments)
    return json.dumps(msg).encode() + b"\r\n"


class QmpClient:
    """One QMP connection in command mode; get one with :func:`open_qmp`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._parser = QmpParser()
        self._lock = trio.Lock()
        self._next_id = 1
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        while True:
            msg = self._parser.next_message()
            if msg is not None:
                return msg
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QmpProtocolError(f"the device model's QMP socket broke: {exc}") from None
            if not data:
                raise QmpProtocolError("the device model closed its QMP socket")
            self._parser.receive_data(data)

    async def _handshake(self) -> None:
        greeting = await self._receive()
        if "QMP" not in greeting:
            raise QmpProtocolError(f"no QMP greeting: {greeting!r}")
        self.greeting = greeting
        await self.execute("qmp_capabilities")

    async def execute(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run a command and return its ``return`` value; :class:`QmpError` if it failed."""
        async with self._lock:
            rid = self._next_id
            self._next_id += 1
            try:
                await self._stream.send_all(command(name, arguments, rid))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QmpProtocolError(f"QMP {name}: the device model is gone ({exc})") from None
            while True:
                msg = await self._receive()
                if "event" in msg:
                    self.events.append(msg)
                    continue
                if msg.get("id") not in (rid, None):
                    continue
                if "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {}
                    raise QmpError(
                        str(err.get("desc", "")),
                        str(err.get("class", "GenericError")),
                        command=name,
                    )
                if "return" in msg:
                    return msg["return"]
                raise QmpProtocolError(f"QMP {name}: unexpected reply {msg!r}")

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def open_qmp(path: str | os.PathLike[str]) -> AsyncIterator[QmpClient]:
    """Connect to a QMP socket and enter command mode."""
    try:
        stream = await trio.open_unix_socket(os.fspath(path))
    except OSError as exc:
        raise QmpProtocolError(f"cannot connect to QMP at {os.fspath(path)}: {exc}") from None
    client = QmpClient(stream)
    try:
        await client._handshake()
        yield client
    finally:
        await trio.aclose_forcefully(stream)

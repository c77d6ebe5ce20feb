"""A blocking hypercall client: the privcmd file descriptor of code that must stay synchronous.

QEMU's mapcache maps guest memory from plain C, through an ioctl on ``/dev/xen/privcmd``
(``IOCTL_PRIVCMD_MMAPBATCH_V2`` behind ``xenforeignmemory_map2``).  This class plays that fd: a
plain socket to ``hypervisor.sock``, one request at a time, no event loop.  Notifications that
arrive meanwhile are kept in :attr:`Privcmd.notifications`.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from types import TracebackType
from typing import Any, cast

from .protocol import (
    ForeignMap,
    FrameDecoder,
    HypercallError,
    HypervisorDisconnected,
    Request,
    VersionInfo,
    pack,
    unpack,
)


class Privcmd:
    """A synchronous connection to hypervisor-sim."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(os.fspath(path))
        except OSError:
            self._sock.close()
            raise
        self._decoder = FrameDecoder()
        self._next_id = 1
        self.notifications: deque[dict[str, Any]] = deque()

    def __enter__(self) -> Privcmd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, call: str, **args: Any) -> Any:
        """Any hypercall by name; blocks until its reply; raises :class:`HypercallError`."""
        rid = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(pack(Request(rid, call, args).to_wire()))
        except OSError as exc:
            raise HypervisorDisconnected(f"connection to hypervisor lost: {exc}") from None
        while True:
            payload = self._decoder.next_payload()
            if not isinstance(payload, bytes):
                try:
                    data = self._sock.recv(65536)
                except OSError as exc:
                    raise HypervisorDisconnected(f"connection to hypervisor lost: {exc}") from None
                if not data:
                    raise HypervisorDisconnected("hypervisor closed the connection")
                self._decoder.receive_data(data)
                continue
            message = unpack(payload)
            if "event" in message:
                self.notifications.append(message)
            elif message.get("id") == rid:
                if "error" in message:
                    raise HypercallError(
                        str(message["error"]), str(message.get("message", "")), call
                    )
                return message.get("result")

    def version(self) -> VersionInfo:
        return cast(VersionInfo, self.call("version"))

    def map_foreign(self, domid: int, gfns: list[int]) -> ForeignMap:
        """Where each gfn's frame lives: the memory file and per-gfn offsets (or -1 + errno)."""
        return cast(ForeignMap, self.call("map_foreign", domid=domid, gfns=list(gfns)))

    def sequence(self, calls: list[tuple[str, dict[str, Any]]]) -> int:
        """Hypercalls run in order in one round trip, stopping at the first failure (raised as
        :class:`HypercallError`); each is still its own hypercall to the hypervisor."""
        return int(self.call("sequence", calls=[[c, a] for c, a in calls]))

    def restrict(self, domid: int) -> None:
        """``IOCTL_PRIVCMD_RESTRICT``: from now on only ``domid`` may be named."""
        self.call("restrict", domid=domid)

    def p2m(self, domid: int) -> list[tuple[int, int]]:
        return [(int(a), int(n)) for a, n in self.call("p2m", domid=domid)]

"""The Xen handles the device model opens, over this simulation's connections.

cf. QEMU hw/xen/xen-operations.c and include/hw/xen/xen_backend_ops.h: QEMU reaches xenstore,
foreign memory and the control libraries through tables of operations; here the blocking
device code reaches xenstore through the trio client (:class:`XenStoreBridge`), makes its
hypercalls on a privcmd connection (:class:`PrivcmdHypercalls`), and ``xen_restrict`` finds
the handles it can restrict in :class:`DeviceModelHandles`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from hypervisor_sim.client import HypervisorClient, open_hypervisor
from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenstored_sim.client import XsClient, XsDisconnected
from xenstored_sim.wire import XsError

from .errors import QemuExit

log = logging.getLogger("qemu_model")


class XenStoreBridge:
    """The machine's blocking xenstore, run on the trio client from a worker thread."""

    def __init__(self, client: XsClient, token: trio.lowlevel.TrioToken) -> None:
        self._client: XsClient | None = client
        self._token = token

    def close(self) -> None:
        self._client = None

    def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def read(self, path: str) -> str | None:
        if self._client is None:
            return None
        try:
            value: bytes = self._run(self._client.read, path)
        except (XsError, XsDisconnected):
            return None
        return value.decode("utf-8", "surrogateescape")

    def write(self, path: str, value: str) -> bool:
        if self._client is None:
            return False
        try:
            self._run(self._client.write, path, value)
        except (XsError, XsDisconnected):
            return False
        return True

    def directory(self, path: str) -> list[str] | None:
        if self._client is None:
            return None
        try:
            names: list[str] = self._run(self._client.directory, path)
        except (XsError, XsDisconnected):
            return None
        return names


class PrivcmdHypercalls:
    """The machine's blocking hypercalls on the privcmd connection."""

    def __init__(self, privcmd: Privcmd) -> None:
        self._p = privcmd

    def populate_physmap(self, domid: int, gfns: list[int]) -> int:
        return int(self._p.call("populate_physmap", domid=domid, gfns=gfns))

    def add_to_physmap(self, domid: int, space: str, idx: int, gpfn: int) -> None:
        self._p.call("add_to_physmap", domid=domid, space=space, idx=idx, gpfn=gpfn)

    def add_to_physmap_each(self, domid: int, space: str, moves: list[tuple[int, int]]) -> None:
        """The per-page loop: one hypercall per page, sent in one round trip."""
        self._p.sequence(
            [
                ("add_to_physmap", {"domid": domid, "space": space, "idx": i, "gpfn": g})
                for i, g in moves
            ]
        )

    def relocate_memory(self, domid: int, src_gfn: int, dst_gfn: int, nr: int) -> None:
        self._p.call("relocate_memory", domid=domid, src_gfn=src_gfn, dst_gfn=dst_gfn, nr=nr)

    def pin_memory_cacheattr(self, domid: int, start: int, end: int, type: int) -> None:
        self._p.call("pin_memory_cacheattr", domid=domid, start=start, end=end, type=type)

    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes:
        result = self._p.call("track_dirty_vram", domid=domid, first_pfn=first_pfn, nr=nr)
        return bytes(result["bitmap"])

    def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None:
        self._p.call("modified_memory", domid=domid, first_pfn=first_pfn, nr=nr)


@contextlib.asynccontextmanager
async def open_hypervisor_or_exit(path: Path) -> AsyncIterator[HypervisorClient]:
    """``open_hypervisor``, with a failure to connect said in one line naming the socket."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            hv = await stack.enter_async_context(open_hypervisor(path))
        except OSError as exc:
            raise QemuExit(
                f"xen: cannot reach hypervisor-sim at {path}: {exc.strerror or exc}"
            ) from None
        yield hv


class DeviceModelHandles:
    """The handles ``xen_restrict`` can restrict, over this device model's connections.

    Called from a worker thread; the trio client is reached with ``trio.from_thread``.
    """

    def __init__(self, privcmd: Privcmd, xc: Privcmd, hv: HypervisorClient) -> None:
        self._privcmd, self._xc, self._hv = privcmd, xc, hv

    def _run(self, *steps: Callable[[int], object], domid: int) -> int:
        try:
            for step in steps:
                step(domid)
        except (HypercallError, HypervisorDisconnected) as exc:
            log.error("restrict: %s", exc)
            return -errno.EPERM
        return 0

    def _devicemodel(self, domid: int) -> None:
        trio.from_thread.run(self._hv.restrict, domid)

    def restrict_devicemodel(self, domid: int) -> int:
        return self._run(self._devicemodel, domid=domid)

    def restrict_foreignmemory(self, domid: int) -> int:
        return self._run(self._privcmd.restrict, domid=domid)

    def restrict_all(self, domid: int) -> int:
        """``xentoolcore_restrict_all``: every handle (xenstore is closed by the caller)."""
        return self._run(self._privcmd.restrict, self._xc.restrict, self._devicemodel, domid=domid)

"""The trio client of hypervisor-sim.

::

    async with open_hypervisor(RunDir(rundir).hypervisor_socket) as hv:
        domid = await hv.domain_create("guest", max_pages=4096)
        await hv.populate_physmap(domid, range(0, 4096))
        server = await hv.ioreq_server_create(domid)
        async for ioreq in hv.ioreqs():
            await hv.ioreq_complete(ioreq.seq, 0)

Replies are matched to requests by id, so any number of tasks may call at once.  Failed calls
raise :class:`~hypervisor_sim.protocol.HypercallError`; when the connection goes, every waiting
call and the ioreq iterator fail with :class:`~hypervisor_sim.protocol.HypervisorDisconnected`.
There are no timeouts: wrap calls in :func:`trio.fail_after`.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import trio

from .protocol import (
    DomainInfo,
    ForeignMap,
    FrameDecoder,
    HypercallError,
    HypervisorDisconnected,
    Ioreq,
    MalformedMessage,
    ProtocolError,
    Request,
    VersionInfo,
    pack,
    unpack,
)


class HypervisorClient:
    """A connection to ``hypervisor.sock``; get one with :func:`open_hypervisor`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._next_id = 1
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._events_send, self._events_recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._gone: BaseException | None = None

    # ---------------------------------------------------------------- plumbing

    async def _reader(self) -> None:
        decoder = FrameDecoder()
        why = "hypervisor closed the connection"
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    break
                decoder.receive_data(data)
                while isinstance(payload := decoder.next_payload(), bytes):
                    self._dispatch(unpack(payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            why = f"connection to hypervisor lost: {exc}"
        except (ProtocolError, MalformedMessage) as exc:
            why = f"hypervisor sent a bad frame: {exc}"
        finally:
            self._disconnected(why)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self._events_send.send_nowait(message)
            return
        rid = message.get("id")
        waiter = self._waiting.pop(rid, None) if isinstance(rid, int) else None
        if waiter is not None:
            waiter[1].append(message)
            waiter[0].set()

    def _disconnected(self, why: str) -> None:
        if self._gone is None:
            self._gone = HypervisorDisconnected(why)
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()
        self._events_send.close()

    async def call(self, call: str, **args: Any) -> Any:
        """Any hypercall by name; returns its result or raises :class:`HypercallError`."""
        if self._gone is not None:
            raise HypervisorDisconnected(str(self._gone))
        rid = self._next_id
        self._next_id += 1
        event = trio.Event()
        box: list[dict[str, Any]] = []
        self._waiting[rid] = (event, box)
        try:
            async with self._send_lock:
                await self._stream.send_all(pack(Request(rid, call, args).to_wire()))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._waiting.pop(rid, None)
            raise HypervisorDisconnected(f"connection to hypervisor lost: {exc}") from None
        try:
            await event.wait()
        finally:
            self._waiting.pop(rid, None)
        if not box:
            raise HypervisorDisconnected(str(self._gone))
        reply = box[0]
        if "error" in reply:
            raise HypercallError(str(reply["error"]), str(reply.get("message", "")), call)
        return reply.get("result")

    def notifications(self) -> Notifications:
        """Every notification pushed to this connection, in order (``async for``)."""
        return Notifications(self)

    def ioreqs(self) -> IoreqStream:
        """The ioreqs of the domains this connection serves, as :class:`Ioreq` (``async for``)."""
        return IoreqStream(self)

    async def aclose(self) -> None:
        await self._stream.aclose()

    # ---------------------------------------------------------------- calls

    async def version(self) -> VersionInfo:
        return cast(VersionInfo, await self.call("version"))

    async def domain_create(self, name: str, max_pages: int, hvm: bool = True) -> int:
        """A new domain (paused, as Xen creates them); returns its domid."""
        result = await self.call("domain_create", name=name, max_pages=max_pages, hvm=hvm)
        return int(result["domid"])

    async def domain_destroy(self, domid: int) -> None:
        await self.call("domain_destroy", domid=domid)

    async def domain_pause(self, domid: int) -> None:
        await self.call("domain_pause", domid=domid)

    async def domain_unpause(self, domid: int) -> None:
        await self.call("domain_unpause", domid=domid)

    async def domain_getinfo(self, domid: int) -> DomainInfo:
        return cast(DomainInfo, await self.call("domain_getinfo", domid=domid))

    async def domain_list(self) -> list[DomainInfo]:
        return cast(list[DomainInfo], await self.call("domain_list"))

    async def populate_physmap(self, domid: int, gfns: Iterable[int]) -> int:
        return int(await self.call("populate_physmap", domid=domid, gfns=list(gfns)))

    async def decrease_reservation(self, domid: int, gfns: Iterable[int]) -> int:
        return int(await self.call("decrease_reservation", domid=domid, gfns=list(gfns)))

    async def add_to_physmap(self, domid: int, idx: int, gpfn: int, space: str = "gmfn") -> None:
        await self.call("add_to_physmap", domid=domid, space=space, idx=idx, gpfn=gpfn)

    async def relocate_memory(self, domid: int, src_gfn: int, dst_gfn: int, nr: int) -> None:
        await self.call("relocate_memory", domid=domid, src_gfn=src_gfn, dst_gfn=dst_gfn, nr=nr)

    async def p2m(self, domid: int) -> list[tuple[int, int]]:
        """Populated gfns as ``(first_gfn, count)`` runs."""
        return [(int(a), int(n)) for a, n in await self.call("p2m", domid=domid)]

    async def map_foreign(self, domid: int, gfns: Iterable[int]) -> ForeignMap:
        return cast(ForeignMap, await self.call("map_foreign", domid=domid, gfns=list(gfns)))

    async def restrict(self, domid: int) -> None:
        await self.call("restrict", domid=domid)

    async def ioreq_server_create(self, domid: int) -> int:
        """Become the domain's ioreq server; returns the server id."""
        return int((await self.call("ioreq_server_create", domid=domid))["id"])

    async def ioreq_server_destroy(self, domid: int, server_id: int) -> None:
        await self.call("ioreq_server_destroy", domid=domid, id=server_id)

    async def ioreq_complete(self, seq: int, data: int = 0) -> None:
        await self.call("ioreq_complete", seq=seq, data=data)

    async def shadow_op(self, domid: int, op: str) -> dict[str, Any] | None:
        """``xc_shadow_control``: ``enable_logdirty``, ``peek``, ``clean`` or ``off``."""
        return cast("dict[str, Any] | None", await self.call("shadow_op", domid=domid, op=op))

    async def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes:
        """``xc_hvm_track_dirty_vram``: the bitmap of the range's pages dirtied since the last
        call (``nr == 0`` stops tracking)."""
        result = await self.call("track_dirty_vram", domid=domid, first_pfn=first_pfn, nr=nr)
        return bytes(result["bitmap"])

    async def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None:
        """``xendevicemodel_modified_memory``."""
        await self.call("modified_memory", domid=domid, first_pfn=first_pfn, nr=nr)

    async def guest(self, domid: int, ops: list[Mapping[str, Any]]) -> list[Any]:
        """Run generic guest ops on the domain's vCPU; one result per op."""
        return cast(list[Any], await self.call("guest", domid=domid, ops=list(ops)))

    async def guest_driver(
        self, domid: int, device: str, action: str, params: Mapping[str, Any] | None = None
    ) -> Any:
        return await self.call(
            "guest_driver", domid=domid, device=device, action=action, params=dict(params or {})
        )


class Notifications:
    """An async iterator over a connection's notifications; ends with
    :class:`HypervisorDisconnected` when the connection goes."""

    def __init__(self, client: HypervisorClient) -> None:
        self._client = client

    def __aiter__(self) -> Notifications:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._client._events_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise HypervisorDisconnected(str(self._client._gone)) from None


class IoreqStream:
    """An async iterator over a connection's ioreq notifications."""

    def __init__(self, client: HypervisorClient) -> None:
        self._events = Notifications(client)

    def __aiter__(self) -> IoreqStream:
        return self

    async def __anext__(self) -> Ioreq:
        while True:
            event = await self._events.__anext__()
            if event.get("event") == "ioreq":
                return Ioreq.from_event(event)


@asynccontextmanager
async def open_hypervisor(path: str | os.PathLike[str]) -> AsyncIterator[HypervisorClient]:
    """Connect to ``hypervisor.sock``; the connection closes when the block ends."""
    stream = await trio.open_unix_socket(os.fspath(path))
    client = HypervisorClient(stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await client.aclose()
    except BaseExceptionGroup as group:
        # The reader never raises, so a group holds the caller's own exception: unwrap it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise

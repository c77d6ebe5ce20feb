"""The trio shell of hypervisor-sim: the hypercall socket, connections, ioreq delivery, audit.

Each connection has a reader task that splits frames and runs synchronous hypercalls in order
through the pure core (:mod:`hypervisor_sim.core`).  ``guest`` and ``guest_driver`` wait for the
guest's vCPU (and maybe for a device model's ``ioreq_complete``), so each runs in a task of its
own in the connection's nursery: a device model can make hypercalls, such as
``relocate_memory``, while an ioreq it owes an answer to is pending.  Guest actors live in the
server's nursery, one per domain, and stop when the domain is destroyed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket as stdsocket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final

import trio

from xenhost import RunDir
from xenstored_sim.startup import OwnedSocket, answering_pid, listen_unix

from . import guest_drivers
from .core import DomainCreated, DomainDestroyed, Hypervisor, IoreqDone, all_ones
from .guest import Guest
from .protocol import (
    FrameDecoder,
    HypercallError,
    IoreqDir,
    IoreqType,
    MalformedMessage,
    ProtocolError,
    check_args,
    error_reply,
    ok_reply,
    pack,
    parse_request,
    unpack,
)

_ASYNC_CALLS: Final = frozenset({"guest", "guest_driver"})
_UCRED: Final = struct.Struct("3i")


@dataclass
class Peer:
    pid: int | None
    cmdline: list[str]
    #: The principal whose own socket the connection came in on (``--principal-socket``).
    principal: str | None = None


def peer_of(sock: trio.socket.SocketType) -> Peer:
    """The peer process, from ``SO_PEERCRED`` and ``/proc/<pid>/cmdline``."""
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _UCRED.size)
        pid, _uid, _gid = _UCRED.unpack(raw)
    except OSError:
        return Peer(None, [])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        cmdline = []
    return Peer(pid, cmdline)


def _peer_record(peer: Peer) -> dict[str, Any]:
    record: dict[str, Any] = {"pid": peer.pid, "cmdline": peer.cmdline}
    if peer.principal is not None:
        record["principal"] = peer.principal
    return record


class AuditLog:
    """JSON Lines: one record per hypercall and per guest op."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f: IO[str] = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def record(self, **fields: Any) -> None:
        self._f.write(json.dumps({"t": round(time.time(), 6), **fields}) + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class Connection:
    id: int
    stream: trio.SocketStream
    peer: Peer
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send a frame; a peer that went away is noticed by the reader, not here."""
        if self.closed:
            return
        try:
            frame = pack(message)
        except ValueError as exc:
            rid = message.get("id")
            frame = pack(error_reply(rid, "E2BIG", str(exc)))
        async with self.send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True


class HypervisorServer:
    """hypervisor-sim: owns the core, the listener, the connections and the guest actors."""

    def __init__(
        self,
        rundir: str,
        xen_libs: str = "4.17",
        audit: AuditLog | None = None,
        principal_sockets: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.rundir = rundir
        self.sock_path = str(RunDir(rundir).hypervisor_socket)
        #: (principal, path) of the further sockets, one per principal (architecture.md,
        #: "Principals in the audit logs").
        self.principal_sockets = principal_sockets
        self.mem_dir = str(RunDir(rundir).memory_dir)
        self.core = Hypervisor(self.mem_dir, xen_libs)
        self.audit = audit
        self.conns: dict[int, Connection] = {}
        self.guests: dict[int, Guest] = {}
        self._waiters: dict[int, tuple[trio.Event, list[int]]] = {}
        self._next_conn = 1
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``RUNDIR/hypervisor.sock`` until cancelled; then remove the socket and
        every domain's frame file."""
        try:
            os.makedirs(self.mem_dir, exist_ok=True)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot create {self.mem_dir}: {exc.strerror or exc}"
            ) from None
        # Unless another hypervisor answers here (then this one must not start), frame files
        # left by a killed one belong to domains that no longer exist: removed before the
        # socket appears, so none of them can be a new domain's.
        answering_pid(self.sock_path)
        self._remove_stale_frames()
        # The principals' sockets first: the daemon is ready when hypervisor.sock accepts.
        sockets = [*self.principal_sockets, (None, self.sock_path)]
        bound: list[tuple[str | None, OwnedSocket]] = []
        try:
            for principal, path in sockets:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                bound.append((principal, listen_unix(path, backlog=64)))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for principal, owned in bound:
                    sock = trio.socket.from_stdlib_socket(owned.sock)
                    nursery.start_soon(self._serve_listener, principal, sock, nursery)
                task_status.started()
        finally:
            for _, owned in bound:
                owned.sock.close()
            for g in self.guests.values():
                g.stop()
            self.core.destroy_all()
            self.core.take_effects()
            for _, owned in bound:
                owned.remove()

    async def _serve_listener(
        self, principal: str | None, sock: trio.socket.SocketType, nursery: trio.Nursery
    ) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            await self._handle(stream, principal)

        listener = trio.SocketListener(sock)
        await trio.serve_listeners(handle, [listener], handler_nursery=nursery)

    def _remove_stale_frames(self) -> None:
        for entry in os.scandir(self.mem_dir):
            if re.fullmatch(r"dom\d+\.mem", entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # ---------------------------------------------------------------- connections

    async def _handle(self, stream: trio.SocketStream, principal: str | None = None) -> None:
        peer = peer_of(stream.socket)
        peer.principal = principal
        conn = Connection(self._next_conn, stream, peer)
        self._next_conn += 1
        self.conns[conn.id] = conn
        self.core.connect(conn.id)
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(conn, nursery)
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            del self.conns[conn.id]
            self.core.disconnect(conn.id)
            self._apply_effects()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_loop(self, conn: Connection, nursery: trio.Nursery) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = await conn.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            decoder.receive_data(data)
            while True:
                try:
                    payload = decoder.next_payload()
                except ProtocolError as exc:
                    await conn.send(error_reply(None, "E2BIG", str(exc)))
                    self._audit(conn, "<frame>", None, "E2BIG")
                    return
                if not isinstance(payload, bytes):
                    break
                await self._on_frame(conn, payload, nursery)

    async def _on_frame(self, conn: Connection, payload: bytes, nursery: trio.Nursery) -> None:
        try:
            req = parse_request(unpack(payload))
        except MalformedMessage as exc:
            self._audit(conn, "<malformed>", None, "EINVAL")
            await conn.send(error_reply(exc.id, "EINVAL", str(exc)))
            return
        if req.call in _ASYNC_CALLS:
            nursery.start_soon(self._async_call, conn, req.id, req.call, req.args)
            return
        try:
            if req.call == "sequence":
                result = self._sequence(conn, req.args)
            else:
                result = self.core.call(conn.id, req.call, req.args)
        except HypercallError as exc:
            self._audit(conn, req.call, req.args.get("domid"), exc.errno_name)
            await conn.send(error_reply(req.id, exc.errno_name, exc.message))
        else:
            self._audit(conn, req.call, req.args.get("domid"), "ok")
            await conn.send(ok_reply(req.id, result))
        self._apply_effects()

    def _sequence(self, conn: Connection, args: dict[str, Any]) -> int:
        """Synchronous hypercalls made one after the other, as a caller's loop would make them,
        stopping at the first failure; each is audited as its own hypercall.  Only the round
        trips are saved (a device model's per-page relocation loop)."""
        check_args("sequence", args)
        calls = args["calls"]
        for i, item in enumerate(calls):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], dict)
                or item[0] in _ASYNC_CALLS
                or item[0] == "sequence"
            ):
                raise HypercallError("EINVAL", f"sequence item {i} is not [call, {{args}}]")
            call, call_args = item
            try:
                self.core.call(conn.id, call, call_args)
            except HypercallError as exc:
                self._audit(conn, call, call_args.get("domid"), exc.errno_name)
                raise HypercallError(
                    exc.errno_name, f"{exc.message} (call {i} of {len(calls)})"
                ) from None
            self._audit(conn, call, call_args.get("domid"), "ok")
        return len(calls)

    async def _async_call(
        self, conn: Connection, rid: int, call: str, args: dict[str, Any]
    ) -> None:
        domid = args.get("domid")
        try:
            check_args(call, args)
            self.core.check_target(conn.id, call, domid)
            assert isinstance(domid, int)
            self.core.domain(domid)
            guest = self.guests[domid]
            if call == "guest":
                result: Any = await guest.submit(args["ops"])
            else:
                result = await self._guest_driver(guest, args)
        except HypercallError as exc:
            self._audit(conn, call, domid, exc.errno_name)
            await conn.send(error_reply(rid, exc.errno_name, exc.message))
        else:
            self._audit(conn, call, domid, "ok")
            await conn.send(ok_reply(rid, result))

    async def _guest_driver(self, guest: Guest, args: Mapping[str, Any]) -> Any:
        """Run a video-driver action: ``guest_drivers.driver_ops`` turns it into generic ops
        (docs/architecture.md, "The scriptable guest"); the result is one value per op."""
        try:
            ops = guest_drivers.driver_ops(args["device"], args["action"], args.get("params", {}))
        except (KeyError, ValueError, TypeError) as exc:
            raise HypercallError("EINVAL", f"guest driver: {exc}") from None
        return await guest.submit(list(ops))

    # ---------------------------------------------------------------- effects and ioreqs

    def _apply_effects(self) -> None:
        for effect in self.core.take_effects():
            if isinstance(effect, IoreqDone):
                waiter = self._waiters.pop(effect.seq, None)
                if waiter is not None:
                    waiter[1].append(effect.value)
                    waiter[0].set()
            elif isinstance(effect, DomainCreated):
                guest = Guest(
                    self.core,
                    effect.domid,
                    self._ioreq,
                    str(RunDir(self.rundir).guest_socket(effect.domid)),
                    self._audit_guest_op,
                )
                self.guests[effect.domid] = guest
                assert self._nursery is not None
                self._nursery.start_soon(guest.run)
            elif isinstance(effect, DomainDestroyed):
                g = self.guests.pop(effect.domid, None)
                if g is not None:
                    g.stop()

    async def _ioreq(
        self, domid: int, type: IoreqType, dir: IoreqDir, addr: int, size: int, data: int
    ) -> int:
        """One emulated access of the guest: deliver the ioreq and wait for its completion."""
        sent = self.core.ioreq_send(domid, type, dir, addr, size, data)
        if sent is None:
            return all_ones(size) if dir == "read" else 0
        conn_id, event = sent
        done = trio.Event()
        box: list[int] = []
        self._waiters[event["seq"]] = (done, box)
        conn = self.conns.get(conn_id)
        if conn is None or conn.closed:
            self.core.disconnect(conn_id)
            self._apply_effects()
        else:
            await conn.send(event)
            if conn.closed:
                self.core.disconnect(conn_id)
                self._apply_effects()
        await done.wait()
        return box[0]

    # ---------------------------------------------------------------- audit

    def _audit(self, conn: Connection, call: str, domid: object, result: str) -> None:
        # Written before the reply goes out, so a caller that saw the reply finds the record.
        if self.audit is None:
            return
        self.audit.record(
            conn=conn.id,
            peer=_peer_record(conn.peer),
            call=call,
            domid=domid if isinstance(domid, int) else None,
            result=result,
        )

    def _audit_guest_op(self, domid: int, op: str, result: str) -> None:
        if self.audit is not None:
            self.audit.record(
                conn=None, peer=None, call="guest_op", op=op, domid=domid, result=result
            )

"""The trio xenstore client: one connection, many concurrent requests, watches, transactions.

Theory of operation: a reader task, owned by the ``async with`` block of :func:`open_xenstore`
or :func:`wrap_xenstore`, feeds every byte it receives straight into a
:class:`~xenstored_sim.wire.PacketDecoder`, with no checkpoint in between, and hands whole
packets on: replies to the :class:`~.replies.ReplyMatcher` (by ``req_id``), WATCH_EVENTs to the
:class:`~.watches.WatchTable` (by token and path).  Requests are written under a lock, one whole
frame at a time; a frame interrupted half-way leaves the stream unusable, so the connection is
then closed.  When the connection ends, for whatever reason, every waiting request and every
watch iterator raises :class:`~.errors.XsDisconnected`.

No call takes a timeout: wrap calls in :func:`trio.fail_after` or :func:`trio.move_on_after`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar, final

import trio

from ..wire import (
    Op,
    Packet,
    PacketDecoder,
    ProtocolError,
    RemoteProtocolError,
    XsError,
    encode,
    join_args,
    split_args,
)
from .errors import WatchOverflow, XsDisconnected
from .paths import default_socket_path
from .replies import ReplyMatcher
from .watches import WatchEvent, WatchTable, parse_watch_event

__all__ = [
    "DirectoryPart",
    "Transaction",
    "Watch",
    "XsClient",
    "XsClientStatistics",
    "open_xenstore",
    "wrap_xenstore",
]

T = TypeVar("T")

_RECEIVE_SIZE: Final = 65536
#: Events a watch holds for a slow reader before :class:`WatchOverflow`.
DEFAULT_WATCH_BUFFER: Final = 128
#: How often :meth:`XsClient.run_transaction` tries before it lets EAGAIN through.
DEFAULT_TRANSACTION_ATTEMPTS: Final = 16
#: A DIRECTORY_PART listing restarts when the node changes under it; it gives up after this.
_DIRECTORY_PART_RESTARTS: Final = 16
#: Bound on the shielded clean-up (UNWATCH, abort) when a block exits by an exception.
_CLEANUP_GRACE: Final = 5.0


class DirectoryPart(NamedTuple):
    """One DIRECTORY_PART reply (docs/xenstore.md, 'Payloads').

    ``generation`` changes whenever the children change; ``complete`` is true when the reply
    reaches the end of the child list.  The next offset is the given one plus
    ``sum(len(name) + 1 for name in names)``.
    """

    generation: str
    names: list[str]
    complete: bool


@dataclass(frozen=True, slots=True)
class XsClientStatistics:
    """A snapshot of a client's bookkeeping, from :meth:`XsClient.statistics`."""

    pending_replies: int
    watches: int
    connected: bool


@final
class _ReplySlot:
    """The trio side of a :class:`~.replies.Waiter`: one reply, or the reason there is none."""

    __slots__ = ("_done", "packet", "reason")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.packet: Packet | None = None
        self.reason: BaseException | None = None

    @property
    def resolved(self) -> bool:
        return self._done.is_set()

    def deliver(self, packet: Packet) -> None:
        self.packet = packet
        self._done.set()

    def fail(self, reason: BaseException) -> None:
        self.reason = reason
        self._done.set()

    async def wait(self) -> Packet:
        await self._done.wait()
        if self.packet is None:
            raise _disconnected(self.reason)
        return self.packet


def _disconnected(reason: BaseException | None) -> XsDisconnected:
    exc = XsDisconnected(f"xenstore connection lost: {reason}")
    exc.__cause__ = reason
    return exc


@final
class Watch:
    """The events of one watch, as an async iterator of :class:`~.watches.WatchEvent`.

    Made by :meth:`XsClient.watch`.  At most ``buffer`` events wait for the reader; the policy
    when more arrive is :class:`~.errors.WatchOverflow`.  The iteration ends when the watch is
    dropped by :meth:`XsClient.reset_watches`, and raises :class:`~.errors.XsDisconnected` when
    the connection ends.
    """

    __slots__ = ("_end", "_receive", "_send", "path", "token")

    def __init__(self, path: str, token: str, buffer: int) -> None:
        self.path = path
        self.token = token
        self._send, self._receive = trio.open_memory_channel[WatchEvent](buffer)
        self._end: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Watch path={self.path!r} token={self.token!r}>"

    @property
    def active(self) -> bool:
        """Whether events can still arrive."""
        return self._end is None

    def _offer(self, event: WatchEvent) -> None:
        # Called by the reader task, which must never block: overflow ends the watch loudly.
        if self._end is not None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            n = self._receive.statistics().current_buffer_used
            self._finish(WatchOverflow(f"{n} unread events on watch {self.path!r} {self.token!r}"))

    def _finish(self, end: BaseException) -> None:
        if self._end is None:
            self._end = end
            self._send.close()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            end = self._end
            if isinstance(end, WatchOverflow):
                raise end from None
            if end is None or isinstance(end, _WatchReset):
                raise StopAsyncIteration from None
            raise _disconnected(end) from end

    async def receive(self) -> WatchEvent:
        """The next event; like ``anext(watch)``, but the end of the watch raises
        :class:`trio.EndOfChannel`."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise trio.EndOfChannel from None


class _WatchReset(Exception):
    """Marks a watch ended by RESET_WATCHES or by leaving its block."""


@final
class XsClient:
    """One xenstore connection.  Made by :func:`open_xenstore` or :func:`wrap_xenstore`.

    Every method that takes ``tx`` works inside that transaction (``0``: none).  Error replies
    raise :class:`~xenstored_sim.wire.XsError`; a lost connection raises
    :class:`~.errors.XsDisconnected`.
    """

    __slots__ = ("_decoder", "_matcher", "_reader_scope", "_send_lock", "_stream", "_watches")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._decoder = PacketDecoder()
        self._matcher: ReplyMatcher[_ReplySlot] = ReplyMatcher()
        self._watches: WatchTable[Watch] = WatchTable()
        self._send_lock = trio.Lock()
        self._reader_scope = trio.CancelScope()

    # -- the connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._matcher.closed_reason is None

    def statistics(self) -> XsClientStatistics:
        return XsClientStatistics(len(self._matcher), len(self._watches), self.connected)

    async def _receive_loop(self) -> None:
        reason: BaseException = XsDisconnected("the client was closed")
        try:
            with self._reader_scope:
                while True:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    # Bytes read go to the decoder before the next checkpoint, so a
                    # cancellation loses none.
                    self._decoder.receive_data(bytes(data))
                    self._handle_buffered()
                    if not data:
                        reason = EOFError("the daemon closed the connection")
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = exc
        except RemoteProtocolError as exc:
            reason = exc
        finally:
            self._disconnect(reason)

    def _handle_buffered(self) -> None:
        while isinstance(packet := self._decoder.next_packet(), Packet):
            if packet.op == Op.WATCH_EVENT:
                event = parse_watch_event(packet)
                for watch in self._watches.route(event):
                    watch._offer(event)
            else:
                self._matcher.dispatch(packet)

    def _disconnect(self, reason: BaseException) -> None:
        self._matcher.drop_all(reason)
        for watch in self._watches.clear():
            watch._finish(reason)
        self._reader_scope.cancel()

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._matcher.closed_reason is not None:
                raise _disconnected(self._matcher.closed_reason)
            try:
                await self._stream.send_all(frame)
            except BaseException as exc:
                # Part of the frame may be on the wire: no later frame could be parsed.
                self._disconnect(exc)
                if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
                    raise _disconnected(exc) from None
                raise

    async def request(self, op: Op | int, payload: bytes = b"", tx_id: int = 0) -> Packet:
        """Send one raw request and return the reply packet as it is (ERROR included)."""
        if self._matcher.closed_reason is not None:
            raise _disconnected(self._matcher.closed_reason)
        req_id = self._matcher.next_req_id()
        frame = encode(Packet(int(op), req_id, tx_id, payload))
        slot = _ReplySlot()
        # Registered before sending: the reply can arrive before send_all returns.
        self._matcher.expect(req_id, slot)
        sent = False
        try:
            await self._send(frame)
            sent = True
            return await slot.wait()
        finally:
            if not slot.resolved:
                self._matcher.abandon(req_id, reply_due=sent)

    async def _call(self, op: Op, payload: bytes, tx: int = 0, path: str | None = None) -> bytes:
        reply = await self.request(op, payload, tx)
        if reply.op == Op.ERROR:
            raise XsError(reply.payload.rstrip(b"\0").decode("ascii", "replace"), op.name, path)
        if reply.op != op:
            raise RemoteProtocolError(f"{op.name} answered by {reply.op_name}")
        return reply.payload

    # -- nodes ------------------------------------------------------------------------------

    async def read(self, path: str, tx: int = 0) -> bytes:
        """The value of a node (raw bytes, possibly empty)."""
        return await self._call(Op.READ, join_args(path), tx, path)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        """Set a node's value, creating it and any missing parents."""
        raw = value.encode() if isinstance(value, str) else value
        await self._call(Op.WRITE, join_args(path) + raw, tx, path)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        """Create a node with an empty value (an existing node is left as it is)."""
        await self._call(Op.MKDIR, join_args(path), tx, path)

    async def rm(self, path: str, tx: int = 0) -> None:
        """Remove a node and its whole subtree."""
        await self._call(Op.RM, join_args(path), tx, path)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        """The names of a node's children, in the daemon's order.

        A list too long for one reply (E2BIG, XSA-72) is read with DIRECTORY_PART, as
        libxenstore does.
        """
        try:
            payload = await self._call(Op.DIRECTORY, join_args(path), tx, path)
        except XsError as exc:
            if exc.errno_name != "E2BIG":
                raise
            return await self._directory_in_parts(path, tx)
        return _names(payload)

    async def directory_part(self, path: str, offset: int, tx: int = 0) -> DirectoryPart:
        """Part of a node's child list, from byte ``offset`` of the NUL-separated names."""
        payload = await self._call(Op.DIRECTORY_PART, join_args(path, str(offset)), tx, path)
        generation, sep, rest = payload.partition(b"\0")
        if not sep:
            raise RemoteProtocolError(f"DIRECTORY_PART reply without a generation: {payload!r}")
        # The list's end is marked by one extra empty name (C send_directory_part).
        complete = rest == b"\0" or rest.endswith(b"\0\0")
        body = rest[:-1] if complete else rest
        return DirectoryPart(generation.decode("ascii", "replace"), _names(body), complete)

    async def _directory_in_parts(self, path: str, tx: int) -> list[str]:
        for _ in range(_DIRECTORY_PART_RESTARTS):
            first = await self.directory_part(path, 0, tx)
            names, part = list(first.names), first
            offset = sum(len(n.encode("utf-8", "surrogateescape")) + 1 for n in names)
            while not part.complete:
                part = await self.directory_part(path, offset, tx)
                if part.generation != first.generation:
                    break
                names += part.names
                offset += sum(len(n.encode("utf-8", "surrogateescape")) + 1 for n in part.names)
            else:
                return names
        raise XsError("EAGAIN", Op.DIRECTORY_PART.name, path)

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        """The permission list, owner first (``["n0", "r5"]``; letters n/r/w/b)."""
        return _names(await self._call(Op.GET_PERMS, join_args(path), tx, path))

    async def set_perms(self, path: str, perms: Sequence[str], tx: int = 0) -> None:
        """Replace the permission list; the first entry names the owner."""
        if isinstance(perms, str):
            raise TypeError("perms is a sequence of strings such as ['n0', 'r5']")
        await self._call(Op.SET_PERMS, join_args(path, *perms), tx, path)

    # -- transactions -----------------------------------------------------------------------

    async def transaction_start(self) -> int:
        """Open a transaction and return its id."""
        reply = await self._call(Op.TRANSACTION_START, b"\0")
        try:
            return int(reply.rstrip(b"\0"))
        except ValueError:
            raise RemoteProtocolError(f"TRANSACTION_START reply {reply!r}") from None

    async def transaction_end(self, tx: int, commit: bool) -> None:
        """Commit (``commit=True``) or abort a transaction.  A conflict raises EAGAIN."""
        await self._call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """``async with xs.transaction() as t:`` commits when the block ends normally and
        aborts when it raises.  A failed commit raises its error (EAGAIN on a conflict) from
        the ``async with`` statement."""
        tx = await self.transaction_start()
        try:
            yield Transaction(self, tx)
        except BaseException:
            await self._cleanup(Op.TRANSACTION_END, b"F\0", tx)
            raise
        await self.transaction_end(tx, commit=True)

    async def run_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_TRANSACTION_ATTEMPTS,
    ) -> T:
        """Run ``await fn(t)`` in a transaction and commit, again from the start on EAGAIN.

        After ``attempts`` conflicts the last EAGAIN is raised.  ``fn`` must be safe to repeat.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as t:
                    result = await fn(t)
            except XsError as exc:
                if exc.errno_name != "EAGAIN" or attempt == attempts:
                    raise
            else:
                return result
        raise AssertionError("unreachable")

    # -- watches ----------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, path: str, token: str, *, buffer: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[Watch]:
        """``async with xs.watch(path, token) as events: async for ev in events:``

        The first event is the one the daemon sends on registration (docs/xenstore.md, 'Watches').
        Leaving the block sends UNWATCH.  See :class:`Watch` for buffering.
        """
        if buffer < 1:
            raise ValueError("a watch buffers at least one event")
        watch = Watch(path, token, buffer)
        try:
            # Registered before the WATCH goes out: the initial event follows the reply at once.
            self._watches.add(path, token, watch)
        except KeyError:
            raise XsError("EEXIST", Op.WATCH.name, path) from None
        try:
            await self._call(Op.WATCH, join_args(path, token), 0, path)
        except BaseException as exc:
            if self._watches.remove(path, token) is watch:
                watch._finish(_WatchReset())
            if not isinstance(exc, XsError):
                # Interrupted after the WATCH may have gone out: make sure the daemon forgets it.
                await self._cleanup(Op.UNWATCH, join_args(path, token), 0)
            raise
        try:
            yield watch
        except BaseException:
            if self._unregister(watch):
                await self._cleanup(Op.UNWATCH, join_args(path, token), 0)
            raise
        if self._unregister(watch) and self.connected:
            await self._call(Op.UNWATCH, join_args(path, token), 0, path)

    def _unregister(self, watch: Watch) -> bool:
        """End a watch locally; True if the daemon still has it."""
        registered = self._watches.remove(watch.path, watch.token) is watch
        watch._finish(_WatchReset())
        watch._receive.close()
        return registered

    async def _cleanup(self, op: Op, payload: bytes, tx: int) -> None:
        # Shielded so it also runs on cancellation, bounded so a stuck daemon cannot hold the
        # caller; errors are dropped: the exception that led here is the one that matters.
        with trio.move_on_after(_CLEANUP_GRACE, shield=True):
            with suppress(XsDisconnected, ProtocolError):
                await self.request(op, payload, tx)

    async def reset_watches(self) -> None:
        """Drop all this connection's watches and transactions in the daemon.

        The iteration of every :class:`Watch` of this client ends.
        """
        await self._call(Op.RESET_WATCHES, b"")
        for watch in self._watches.clear():
            watch._finish(_WatchReset())

    # -- domains ----------------------------------------------------------------------------

    async def introduce(self, domid: int, gfn: int, port: int) -> None:
        """Tell the daemon about a domain's ring page and event channel (privileged)."""
        await self._call(Op.INTRODUCE, join_args(str(domid), str(gfn), str(port)))

    async def release(self, domid: int) -> None:
        """Forget a domain; its nodes are removed and ``@releaseDomain`` fires (privileged)."""
        await self._call(Op.RELEASE, join_args(str(domid)))

    async def resume(self, domid: int) -> None:
        """Clear a domain's shut-down flag (privileged)."""
        await self._call(Op.RESUME, join_args(str(domid)))

    async def is_domain_introduced(self, domid: int) -> bool:
        reply = await self._call(Op.IS_DOMAIN_INTRODUCED, join_args(str(domid)))
        if reply not in (b"T\0", b"F\0"):
            raise RemoteProtocolError(f"IS_DOMAIN_INTRODUCED reply {reply!r}")
        return reply == b"T\0"

    async def get_domain_path(self, domid: int) -> str:
        """``/local/domain/<domid>``, as the daemon spells it."""
        reply = await self._call(Op.GET_DOMAIN_PATH, join_args(str(domid)))
        return reply.rstrip(b"\0").decode("utf-8", "surrogateescape")

    async def set_target(self, domid: int, target: int) -> None:
        """Let ``domid`` (a device-model domain) act on ``target``'s nodes (privileged)."""
        await self._call(Op.SET_TARGET, join_args(str(domid), str(target)))

    async def control(self, *args: str | bytes) -> bytes:
        """XS_CONTROL: the daemon's answer, without its final NUL."""
        reply = await self._call(Op.CONTROL, join_args(*args))
        return reply[:-1] if reply.endswith(b"\0") else reply


@final
class Transaction:
    """The node operations of :class:`XsClient`, bound to one transaction id."""

    __slots__ = ("_client", "id")

    def __init__(self, client: XsClient, tx_id: int) -> None:
        self._client = client
        self.id = tx_id

    def __repr__(self) -> str:
        return f"<Transaction {self.id}>"

    async def read(self, path: str) -> bytes:
        return await self._client.read(path, self.id)

    async def write(self, path: str, value: bytes | str) -> None:
        await self._client.write(path, value, self.id)

    async def mkdir(self, path: str) -> None:
        await self._client.mkdir(path, self.id)

    async def rm(self, path: str) -> None:
        await self._client.rm(path, self.id)

    async def directory(self, path: str) -> list[str]:
        return await self._client.directory(path, self.id)

    async def directory_part(self, path: str, offset: int) -> DirectoryPart:
        return await self._client.directory_part(path, offset, self.id)

    async def get_perms(self, path: str) -> list[str]:
        return await self._client.get_perms(path, self.id)

    async def set_perms(self, path: str, perms: Sequence[str]) -> None:
        await self._client.set_perms(path, perms, self.id)


def _names(payload: bytes) -> list[str]:
    return [name.decode("utf-8", "surrogateescape") for name in split_args(payload)]


@asynccontextmanager
async def wrap_xenstore(stream: trio.abc.Stream) -> AsyncIterator[XsClient]:
    """A client over an already open stream; the stream is closed when the block ends."""
    client = XsClient(stream)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._receive_loop)
            try:
                yield client
            except BaseException as exc:
                # Re-raised below, outside the nursery, so callers see it unwrapped.
                body_error = exc
            finally:
                client._disconnect(XsDisconnected("the client was closed"))
    finally:
        await trio.aclose_forcefully(stream)
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None


@asynccontextmanager
async def open_xenstore(path: str | os.PathLike[str] | None = None) -> AsyncIterator[XsClient]:
    """``async with open_xenstore() as xs:`` connects to a daemon's Unix socket.

    ``path`` defaults to :func:`~.paths.default_socket_path`.  A guest socket
    (``RUNDIR/domains/<domid>.sock``) is opened the same way and acts as that domain.
    """
    target = os.fspath(path) if path is not None else default_socket_path()
    stream = await trio.open_unix_socket(target)
    async with wrap_xenstore(stream) as client:
        yield client

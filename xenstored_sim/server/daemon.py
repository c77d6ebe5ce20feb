"""The trio shell of xenstored-sim: sockets in, engine, outbox out.

Theory of operation.  One nursery owns everything: the privileged listener, one listener per
introduced domain (``RUNDIR/domains/<domid>.sock``, standing in for the domain's ring), the
main loop that serves every client socket (:mod:`.poller`), and a task holding each client
connection open (:mod:`.connection`).  Requests are handled synchronously by the pure
:class:`~xenstored_sim.core.XenstoreEngine`; the shell routes the resulting messages to the
connections' queues and opens or closes guest sockets as domains come and go.

With a state directory, each request's changes are journaled (:mod:`.durable`) before its
messages are routed; under ``--sync batch`` the outboxes wait for the group commit.

CONTROL ``live-update`` from a privileged connection is answered by :mod:`.live_update`,
which can re-execute the daemon with every socket and the engine's state handed over; the
new process then adopts the sockets instead of binding them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from ..core import ConnKind, Outbox, Quotas, XenstoreEngine
from ..core.journal import touches_domains
from ..core.outqueue import PRIVILEGED_OUTSTANDING
from ..startup import OwnedSocket, listen_unix
from ..wire import Op, Packet, encode
from .audit import AuditLog
from .conn_io import FastLane, Reactor
from .connection import ClientConnection
from .durable import DEFAULT_JOURNAL_MAX, DurableStore, SyncPolicy
from .live_update import LiveUpdater
from .peer import peer_of
from .poller import run_main_loop
from .trace import Tracer

log = logging.getLogger("xenstored_sim.server")


@dataclass
class DaemonConfig:
    """Where and how to serve."""

    rundir: str
    socket_path: str
    quotas: Quotas = field(default_factory=Quotas)
    audit_log: str | None = None
    #: Directory of the durable store (server/durable.py); None keeps the store in memory.
    state_dir: str | None = None
    sync: SyncPolicy = SyncPolicy.BATCH
    journal_max: int = DEFAULT_JOURNAL_MAX
    #: Seconds a watch event may wait unread on a guest connection before it is discarded
    #: (C ``--timeout watch-event=``, docs/xenstore.md, 'Watch events and the send queue'); 0 keeps
    #: events forever.
    watch_event_timeout: float = 20.0
    #: Descriptor of the state a live update handed over (server/live_update.py); the
    #: sockets come from it instead of being bound.
    live_update_state: int | None = None
    #: C ``-T/--trace-file``: every request and reply, in C's trace format (server/trace.py).
    trace_file: str | None = None
    #: C ``-K/--keep-orphans``: RELEASE gives the domain's nodes to dom0.
    keep_orphans: bool = False
    #: C ``-F/--pid-file``, ``-P/--output-pid``, ``-V/--verbose`` (handled by the CLI).
    pid_file: str | None = None
    output_pid: bool = False
    verbose: bool = False
    #: (principal, path): further privileged sockets, one per principal the launcher names;
    #: the audit attributes each connection to the socket it came in on (architecture.md,
    #: "Principals in the audit logs").
    principal_sockets: tuple[tuple[str, str], ...] = ()


# accept() failures that mean "no capacity right now", not a broken listener.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 0.1
_CONTROL = int(Op.CONTROL)
_WATCH_EVENT = int(Op.WATCH_EVENT)


def _adopted(listener: socket.socket, path: str) -> OwnedSocket | None:
    """The file of a listener handed over by a live update (gone: nothing to remove)."""
    try:
        return OwnedSocket.adopt(listener, path)
    except OSError:
        return None


class XenstoredServer:
    """Routes bytes between client sockets and the engine."""

    def __init__(self, config: DaemonConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.engine = XenstoreEngine(config.quotas, audit=config.audit_log is not None)
        self.engine.unsent = self._unsent
        self.engine.keep_orphans = config.keep_orphans
        self._audit = AuditLog(config.audit_log) if config.audit_log else None
        self._trace = Tracer(config.trace_file) if config.trace_file else None
        self._nursery = nursery
        self._clients: dict[int, ClientConnection] = {}
        self._reactor = Reactor()
        self._guest_scopes: dict[int, trio.CancelScope] = {}
        #: path -> the socket file bound (or adopted) here, removed at exit if still ours
        self._owned: dict[str, OwnedSocket | None] = {}
        #: domid -> listening socket (0: the privileged socket), for a live update
        self.listeners: dict[int, socket.socket] = {}
        self.principal_listeners: dict[str, socket.socket] = {}
        self._durable: DurableStore | None = None
        self.live_update = LiveUpdater(self)
        # batch sync: outboxes held until the group commit that covers them
        self._pending: list[Outbox] = []
        self._commit_wake = trio.Event()
        if config.state_dir is not None:
            self._durable = DurableStore(
                config.state_dir, self.engine, config.sync, config.journal_max
            )
            self._durable.open()

    # ------------------------------------------------------------------ sockets

    def guest_socket_path(self, domid: int) -> str:
        return os.path.join(self.config.rundir, "domains", f"{domid}.sock")

    def start(self) -> None:
        """Bind the privileged socket and start accepting."""
        os.makedirs(os.path.join(self.config.rundir, "domains"), exist_ok=True)
        self._nursery.start_soon(run_main_loop, self._reactor)
        if self.config.live_update_state is not None:
            self.live_update.restore(self.config.live_update_state)
        else:
            # The principals' sockets first: the daemon is ready when the main one accepts.
            for name, path in self.config.principal_sockets:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                owned_principal = listen_unix(path)
                self.adopt_principal_listener(name, owned_principal.sock, owned_principal)
            owned = listen_unix(self.config.socket_path)
            self.adopt_listener(owned.sock, owned)
            for domid in sorted(self.engine.domains):
                self._open_guest(domid)  # restored from the state directory
        if self._durable is not None and self._durable.sync is SyncPolicy.BATCH:
            self._nursery.start_soon(self._committer)

    def adopt_listener(self, listener: socket.socket, owned: OwnedSocket | None = None) -> None:
        """Accept on the privileged socket (bound here, or handed over by a live update)."""
        path = self.config.socket_path
        self.listeners[0] = listener
        self._owned[path] = owned or _adopted(listener, path)
        self._nursery.start_soon(self._accept_loop, listener, ConnKind.SOCKET, 0)

    def adopt_principal_listener(
        self, name: str, listener: socket.socket, owned: OwnedSocket | None = None
    ) -> None:
        """Accept on ``name``'s own privileged socket; its connections are ``name``'s."""
        self.principal_listeners[name] = listener
        path = dict(self.config.principal_sockets).get(name)
        if path is not None:
            self._owned[path] = owned or _adopted(listener, path)
        self._nursery.start_soon(self._accept_loop, listener, ConnKind.SOCKET, 0, name)

    def _open_guest(self, domid: int, listener: socket.socket | None = None) -> None:
        path = self.guest_socket_path(domid)
        if listener is None:
            try:
                owned: OwnedSocket | None = listen_unix(path)
            except OSError as exc:
                log.error("%s", exc.strerror)
                return
            assert owned is not None
            listener = owned.sock
        else:
            owned = _adopted(listener, path)
        self.listeners[domid] = listener
        self._owned[path] = owned
        scope = trio.CancelScope()
        self._guest_scopes[domid] = scope
        self._nursery.start_soon(self._guest_loop, scope, listener, domid)

    async def _guest_loop(
        self, scope: trio.CancelScope, listener: socket.socket, domid: int
    ) -> None:
        with scope:
            await self._accept_loop(listener, ConnKind.GUEST, domid)

    def _close_guest(self, domid: int) -> None:
        scope = self._guest_scopes.pop(domid, None)
        if scope is not None:
            scope.cancel()
        self.listeners.pop(domid, None)
        owned = self._owned.pop(self.guest_socket_path(domid), None)
        if owned is not None:
            owned.remove()

    async def _accept_loop(
        self, listener: socket.socket, kind: ConnKind, domid: int, principal: str | None = None
    ) -> None:
        with listener:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:
                    # Out of descriptors or memory (a client holding many connections):
                    # refuse for a moment instead of letting the error end the daemon.
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                client = self._new_client(sock, kind, domid, None, principal)
                if client is not None:
                    self._nursery.start_soon(self._serve_client, client)

    def remove_sockets(self) -> None:
        for owned in self._owned.values():
            if owned is not None:
                owned.remove()
        self._owned.clear()
        self._flush_audit()

    # -------------------------------------------------------------- connections

    def _new_client(
        self,
        sock: socket.socket,
        kind: ConnKind,
        domid: int,
        adopted: tuple[int, bytes, bytes] | None = None,
        principal: str | None = None,
    ) -> ClientConnection | None:
        """Connect ``sock`` to the engine and register it, at once: a connection accepted
        is part of the state a live update hands over from then on (as C's
        tools/xenstored/core.c: accept_connection() creates it within the poll loop)."""
        engine = self.engine
        if adopted is not None:
            conn_id = adopted[0]  # a live update restored the engine's connection
        else:
            peer: dict[str, Any] = {}
            if self._audit is not None:
                peer = peer_of(sock)
                peer["guest"] = kind is ConnKind.GUEST
                if principal is not None:
                    peer["principal"] = principal
            try:
                conn_id = engine.connect(kind, domid, peer)
            except LookupError:
                sock.close()
                return None

        def limit() -> int:
            return engine.outstanding_limit(conn_id) or PRIVILEGED_OUTSTANDING

        timeout = self.config.watch_event_timeout
        client = ClientConnection(
            conn_id,
            sock,
            self._reactor,
            self._fast_lane(),
            self._deliver,
            self.dispatch,
            limit,
            event_timeout=timeout if kind is ConnKind.GUEST and timeout > 0 else None,
        )
        if adopted is not None:
            client.adopt(adopted[1], adopted[2])
        self._clients[conn_id] = client
        self._flush_audit()
        if self._trace is not None:
            self._trace.connection(conn_id, True)
        return client

    async def _serve_client(self, client: ClientConnection) -> None:
        conn_id = client.conn_id
        try:
            await client.run()
        finally:
            del self._clients[conn_id]
            self.engine.disconnect(conn_id)
            self._flush_audit()
            if self._trace is not None:
                self._trace.connection(conn_id, False)

    def _fast_lane(self) -> FastLane | None:
        """The engine's fast lane, unless a state directory or a trace file must see every
        reply (then each request takes :meth:`dispatch`)."""
        if self._durable is not None or self._trace is not None:
            return None
        return self.engine.answer_fast

    def dispatch(self, conn_id: int, packet: Packet) -> None:
        """Run one request and deliver everything it causes."""
        if not self.engine.is_connected(conn_id):
            return
        if packet.op == _CONTROL and self.live_update.handles(conn_id, packet):
            return
        if self._trace is not None:
            self._trace.io(conn_id, packet, False)
        try:
            # The fast requests before this one took the engine's fast lane (conn_io.py).
            out = self.engine.handle(conn_id, packet)
        except Exception:
            # A bug must not take the daemon down: this client alone is dropped.
            log.exception("request %s of connection %d failed", packet.op, conn_id)
            client = self._clients.get(conn_id)
            if client is not None:
                client.close()
            return
        if self._durable is not None and self._journal(packet, out):
            return
        self._deliver(out)

    def _deliver(self, out: Outbox) -> None:
        clients = self._clients
        trace = self._trace
        # A domain's socket exists (or is gone) before the reply that says so is sent: output
        # may leave at once (Connection.push), as C creates the connection inside
        # do_introduce() before send_ack().
        for domid in out.introduced:
            self._open_guest(domid)
        for domid in out.released:
            self._close_guest(domid)
        if self._audit is not None:  # written before the reply can reach the client
            self._audit.write(self.engine.take_audit())
        touched: dict[int, ClientConnection] = {}
        for target, message in out:
            client = clients.get(target)
            if client is not None:
                if trace is not None:
                    trace.io(target, message, True)
                if message.op == _WATCH_EVENT:
                    client.push_event(encode(message))
                else:
                    client.push(encode(message))
                touched[target] = client
        for client in touched.values():
            client.flush()
        for cid in out.closed:
            client = clients.get(cid)
            if client is not None:
                client.close()

    def _unsent(self, conn_id: int) -> int:
        client = self._clients.get(conn_id)
        return client.unsent if client is not None else 0

    def _journal(self, packet: Packet, out: Outbox) -> bool:
        """Journal what a request changed; True if its outbox waits for the group commit.

        An I/O error propagates and stops the daemon: a reply must never claim a change
        that is not in the journal.
        """
        durable = self._durable
        assert durable is not None
        wrote = durable.record(touches_domains(packet.op, packet.payload))
        if durable.sync is SyncPolicy.BATCH:
            if wrote or self._pending:  # a reply never overtakes an earlier change's fsync
                self._pending.append(out)
                self._commit_wake.set()
                return True
        elif durable.needs_compaction():
            durable.compact()
        return False

    async def _committer(self) -> None:
        """Group commit: one fsync for every change journaled since the last, then their
        replies, in order."""
        durable = self._durable
        assert durable is not None
        while True:
            await self._commit_wake.wait()
            self._commit_wake = trio.Event()
            batch, self._pending = self._pending, []
            if durable.unsynced:
                durable.sync_journal()  # blocks the loop: requests pile up for the next batch
            for out in batch:
                self._deliver(out)
            if durable.needs_compaction():
                durable.compact()

    def close_state(self) -> None:
        """fsync and close the state directory's journal; close the audit log (after the
        connections' tasks, which record their disconnects)."""
        if self._durable is not None:
            self._durable.close()
        if self._audit is not None:
            self._audit.write(self.engine.take_audit())
            self._audit.close()
        if self._trace is not None:
            self._trace.close()

    def close_reactor(self) -> None:
        self._reactor.close()

    def _flush_audit(self) -> None:
        if self._audit is not None:
            self._audit.write(self.engine.take_audit())

    # -------------------------------------------------------------- live update

    @property
    def clients(self) -> dict[int, ClientConnection]:
        """The served connections by engine connection id."""
        return self._clients

    def reply(self, out: Outbox) -> None:
        """Deliver the outbox of a request that changed nothing, after any earlier change's
        outbox still waiting for the group commit."""
        if self._pending:
            self._pending.append(out)
            self._commit_wake.set()
        else:
            self._deliver(out)

    def settle(self) -> None:
        """fsync the journal and deliver every held outbox now; flush the audit log."""
        durable = self._durable
        if durable is not None:
            durable.sync_journal()
        batch, self._pending = self._pending, []
        for out in batch:
            self._deliver(out)
        self._flush_audit()

    def serve_adopted(
        self, sock: socket.socket, conn_id: int, unread: bytes, unsent: bytes
    ) -> None:
        """Serve a connection a live update handed over, its engine state already restored."""
        conn = self.engine.conns[conn_id]
        client = self._new_client(sock, conn.kind, conn.domid, (conn_id, unread, unsent))
        if client is not None:
            self._nursery.start_soon(self._serve_client, client)

    def open_guest_listener(self, domid: int, listener: socket.socket) -> None:
        """Serve a domain's guest socket a live update handed over."""
        self._open_guest(domid, listener)


async def serve_xenstored(
    config: DaemonConfig,
    *,
    task_status: trio.TaskStatus[XenstoredServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; the sockets are bound when ``task_status.started`` fires."""
    server: XenstoredServer | None = None
    try:
        async with trio.open_nursery() as nursery:
            server = XenstoredServer(config, nursery)
            try:
                server.start()
                task_status.started(server)
                await trio.sleep_forever()
            finally:
                server.remove_sockets()
    finally:
        # After the nursery: no group-commit fsync can still be using the journal, and no
        # connection is left in the main loop's epoll set.
        if server is not None:
            server.close_state()
            server.close_reactor()

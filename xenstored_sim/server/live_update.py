"""Live update: the daemon re-executes itself and keeps every client connection.

Theory of operation (docs/xenstore.md, 'Live update'; C lu.c, lu_daemon.c).  A privileged client
sends CONTROL ``live-update -f <binary>`` (optional here: the default is the running
program), optionally ``-c <cmdline>`` (extra arguments for the new process), then ``-s``.
``-s`` is handled inside the request's dispatch, so no other request is half done: the shell
fsyncs the journal and delivers every outbox held for the group commit, then
:func:`~xenstored_sim.core.migration.build_stream` serialises the engine with, for every
connection, its socket descriptor, its unread input (a request held back for room in its
queue, then the undecoded rest) and its unsent output.  The requester's ``OK`` is appended to
its unsent output, so it is the *new* process that answers ``-s``, as in C.  The stream goes
into a memfd; the listening sockets, the guest listeners, every client socket and the memfd
are made inheritable, and the process ``exec``s (same pid) with ``--live-update-state FD``.

The new process reads the stream, rebuilds the engine (store, generations, domains, quotas,
connections, watches, open transactions), serves the inherited sockets and sends what was
unsent, the ``OK`` included.  A state directory (``--state-dir``) is reopened as at any
start and continues the same journal; the audit log is appended to.

Differences from C.  C waits with ``-s`` until no transaction is open and fails after the
timeout unless ``-F`` drops them; this daemon carries open transactions over, so ``-s``
never waits and ``-F``/``-t`` are accepted without effect.  An ``exec`` that fails (missing
binary) answers "Error activating new binary." and the daemon continues unchanged.
CONTROL ``live-update`` without arguments answers a status text: the session and the number
of updates the daemon has been through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sys
from collections.abc import Mapping
from typing import Final, Protocol

from ..core import Outbox, XsErrno
from ..core.engine import XenstoreEngine
from ..core.migration import (
    EXEC_FAILED,
    ConnectionState,
    LiveUpdateControl,
    ShellState,
    StartRequest,
    build_stream,
    parse_stream,
    restore_engine,
)
from ..wire import Op, Packet, encode
from .connection import ClientConnection


class LiveUpdateHost(Protocol):
    """What a live update needs of the daemon it serves (C lu.c's view of xenstored's
    globals): the engine, the sockets to hand over or adopt, and reply delivery."""

    @property
    def engine(self) -> XenstoreEngine: ...
    @property
    def clients(self) -> Mapping[int, ClientConnection]: ...
    @property
    def listeners(self) -> Mapping[int, socket.socket]: ...
    @property
    def principal_listeners(self) -> Mapping[str, socket.socket]: ...
    def reply(self, out: Outbox) -> None: ...
    def settle(self) -> None: ...
    def adopt_listener(self, listener: socket.socket) -> None: ...
    def open_guest_listener(self, domid: int, listener: socket.socket) -> None: ...
    def adopt_principal_listener(self, name: str, listener: socket.socket) -> None: ...
    def serve_adopted(
        self, sock: socket.socket, conn_id: int, unread: bytes, unsent: bytes
    ) -> None: ...


log = logging.getLogger("xenstored_sim.live_update")

#: The hidden command-line flag naming the descriptor of the handed-over state.
STATE_FLAG: Final = "--live-update-state"
_COMMAND: Final = b"live-update\0"
_CONTROL: Final = int(Op.CONTROL)
_ERROR: Final = int(Op.ERROR)


def _daemon_args() -> list[str]:
    """This process's daemon arguments without a previous update's state flag, nor
    ``--ready-fd``: that descriptor was closed once the first daemon was ready."""
    args = sys.argv[1:]
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in (STATE_FLAG, "--ready-fd"):
            skip = True
        elif not arg.startswith((STATE_FLAG + "=", "--ready-fd=")):
            kept.append(arg)
    return kept


def _program() -> tuple[str, list[str]]:
    """How this process was started: the executable and the arguments before the daemon's
    own (``python -m xenstored_sim`` or the ``xenstored-sim`` script)."""
    prefix = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
    return sys.executable, prefix


class LiveUpdater:
    """CONTROL ``live-update`` of one server, and the restore of a handed-over state."""

    def __init__(self, server: LiveUpdateHost) -> None:
        self.server = server
        self.control = LiveUpdateControl()

    def handles(self, conn_id: int, packet: Packet) -> bool:
        """Run a privileged ``live-update`` request; False for anything else (the engine
        answers it, EACCES for an unprivileged caller)."""
        payload = packet.payload
        if not payload.startswith(_COMMAND):
            return False
        conn = self.server.engine.conns.get(conn_id)
        if conn is None or not conn.privileged:
            return False
        try:
            if payload[-1] != 0:
                raise XsErrno("EINVAL")
            result = self.control.command(conn_id, payload[:-1].split(b"\0")[1:])
            if isinstance(result, StartRequest):
                result = self._start(conn_id, packet, result)
            reply = Packet(_CONTROL, packet.req_id, packet.tx_id, result.encode() + b"\0")
        except XsErrno as exc:
            reply = Packet(_ERROR, packet.req_id, packet.tx_id, exc.errno_name.encode() + b"\0")
        out = Outbox()
        out.append((conn_id, reply))
        self.server.reply(out)
        return True

    # ------------------------------------------------------------------ old process

    def _start(self, conn_id: int, packet: Packet, req: StartRequest) -> str:
        """Serialise and exec; returns only if the exec failed (the error text)."""
        server = self.server
        if req.binary is not None:
            if not (os.path.isfile(req.binary) and os.access(req.binary, os.X_OK)):
                return EXEC_FAILED
            path, argv = req.binary, [req.binary]
        else:
            path, argv = _program()
        try:
            extra = shlex.split(req.cmdline) if req.cmdline else []
        except ValueError:
            return EXEC_FAILED
        server.settle()
        ok = encode(Packet(_CONTROL, packet.req_id, packet.tx_id, b"OK\0"))
        conns = [
            ConnectionState(
                cid,
                client.fileno(),
                client.pending_input(),
                client.pending_output() + (ok if cid == conn_id else b""),
            )
            for cid, client in server.clients.items()
            if not client.closed
        ]
        listeners = server.listeners
        shell = ShellState(
            socket_fd=listeners[0].fileno(),
            guest_fds={d: s.fileno() for d, s in listeners.items() if d != 0},
            principal_fds={n: s.fileno() for n, s in server.principal_listeners.items()},
            connections=conns,
            updates=self.control.updates + 1,
        )
        stream = build_stream(server.engine, shell)
        fds = [
            shell.socket_fd,
            *shell.guest_fds.values(),
            *shell.principal_fds.values(),
            *(c.fd for c in conns),
        ]
        memfd = -1
        try:
            memfd = os.memfd_create("xenstored-sim-live-update", 0)
            _write_all(memfd, stream)
            fds.append(memfd)
            for fd in fds:
                os.set_inheritable(fd, True)
            argv += [*_daemon_args(), *extra, STATE_FLAG, str(memfd)]
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(path, argv)
        except OSError as exc:
            log.error("live update failed: %s", exc)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if memfd >= 0:
            os.close(memfd)
        return EXEC_FAILED

    # ------------------------------------------------------------------ new process

    def restore(self, fd: int) -> None:
        """Rebuild the engine and serve the sockets of a handed-over state (at start)."""
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        parsed = parse_stream(data)
        server = self.server
        restore_engine(server.engine, parsed)
        shell = parsed.shell_state()
        self.control.updates = shell.updates
        server.adopt_listener(_adopt_socket(shell.socket_fd))
        for domid, gfd in sorted(shell.guest_fds.items()):
            server.open_guest_listener(domid, _adopt_socket(gfd))
        for name, pfd in sorted(shell.principal_fds.items()):
            server.adopt_principal_listener(name, _adopt_socket(pfd))
        for cs in shell.connections:
            server.serve_adopted(_adopt_socket(cs.fd), cs.conn_id, cs.unread, cs.unsent)


def _adopt_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

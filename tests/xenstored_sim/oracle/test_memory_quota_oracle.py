"""The ``memory`` quota (docs/xenstore.md, 'Quotas') against the real C xenstored 4.17.7: the
same requests with ``-Q memory=3000`` to both daemons give the same answers and the same
CONTROL ``quota <domid>`` reports.  Skipped when ``../shared/oracle`` is absent."""

from __future__ import annotations

import difflib
import os
import socket
import struct
import time
from typing import Any

import pytest

from xenstored_sim.wire import Op

HEADER = struct.Struct("=IIII")
ARGS = ("-Q", "memory=3000")


class Client:
    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.01)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def req(self, op: int, payload: bytes, tx: int = 0) -> str:
        """``"<TYPE> <payload>"`` of the reply; watch events are skipped."""
        self.sock.sendall(HEADER.pack(op, 1, tx, len(payload)) + payload)
        while True:
            while len(self.buf) < 16 or len(self.buf) < 16 + HEADER.unpack_from(self.buf)[3]:
                chunk = self.sock.recv(65536)
                assert chunk, "connection closed"
                self.buf += chunk
            typ, _, _, n = HEADER.unpack_from(self.buf)
            body, self.buf = self.buf[16 : 16 + n], self.buf[16 + n :]
            if typ != Op.WATCH_EVENT:
                return f"{Op(typ).name} {body[:200]!r}"


def script(daemon: Any) -> list[str]:
    clients: list[Client] = []
    try:
        return _script(daemon, clients)
    finally:
        for client in clients:
            client.sock.close()


def _script(daemon: Any, clients: list[Client]) -> list[str]:
    p = Client(daemon.socket)
    clients.append(p)
    log = [
        p.req(Op.INTRODUCE, b"7\x001\x001\0"),
        p.req(Op.MKDIR, b"/local/domain/7\0"),
        p.req(Op.SET_PERMS, b"/local/domain/7\0n7\0"),
    ]
    g = Client(daemon.guest_socket(7))
    clients.append(g)

    def quota() -> str:
        return p.req(Op.CONTROL, b"quota\x007\0")

    def step(op: int, payload: bytes, tx: int = 0) -> None:
        log.append(g.req(op, payload, tx))
        # A round trip drains the guest's queue first: C writes one message per pass of its
        # main loop (core.c: write_messages()) and charges what is still queued, so a watch
        # event behind a reply would otherwise be counted or not by timing.
        g.req(Op.GET_DOMAIN_PATH, b"7\0")
        log.append(quota())

    step(Op.WRITE, b"y\0" + b"v" * 1000)
    step(Op.WRITE, b"x\0" + b"v" * 1851)  # would reach 3000 exactly
    step(Op.WRITE, b"x\0" + b"v" * 1850)
    step(Op.READ, b"x\0")  # the reply itself does not fit
    step(Op.DIRECTORY, b"/local/domain/7\0")
    step(Op.WATCH, b"/" + b"w" * 100 + b"\0" + b"t" * 10 + b"\0")
    step(Op.WRITE, b"x\0" + b"v" * 10)
    step(Op.WATCH, b"x\0tok\0")
    step(Op.TRANSACTION_START, b"\0")
    step(Op.WRITE, b"a\0" + b"v" * 100, 1)
    step(Op.READ, b"y\0", 1)
    step(Op.TRANSACTION_END, b"T\0", 1)
    step(Op.RM, b"x\0")
    step(Op.UNWATCH, b"x\0tok\0")
    return log


@pytest.mark.parametrize(("xenstored", "c_xenstored"), [(ARGS, ARGS)], indirect=True)
def test_memory_quota_matches_c(xenstored: Any, c_xenstored: Any) -> None:
    ours = script(xenstored)
    theirs = script(c_xenstored)
    diff = [line for line in difflib.ndiff(theirs, ours) if line[0] in "+-"]
    assert ours == theirs, "\n".join(diff)
    assert "ERROR b'EIO\\x00'" in ours and "ERROR b'ENOMEM\\x00'" in ours

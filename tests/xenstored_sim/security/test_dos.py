"""Denial of service: one guest misbehaving in every way it can must not stall anyone else, and
the daemon's memory stays bounded (docs/xenstore.md, 'Security advisories the tests cover' XSA-206,
docs/xenstore.md, 'Security advisories the tests cover' XSA-326, docs/xenstore.md, 'Security
advisories the tests cover' XSA-416).

The bounds below are deliberately generous: they tell a bounded daemon from one that keeps
whatever a guest sends, not a fast daemon from a slow one.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from xenhost import RunDir
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import Op, XsError

Start = Callable[..., Any]
HEADER = struct.Struct("=IIII")
# Time a well-behaved request may take while the abuse goes on (a hang, not a slowness, fails).
PROGRESS_LIMIT = 10.0
# RSS growth allowed to the daemon during one test.
RSS_GROWTH_KIB = 96 * 1024


def frame(op: int, payload: bytes, req_id: int = 1, tx: int = 0) -> bytes:
    return HEADER.pack(op, req_id, tx, len(payload)) + payload


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def home(priv: Any, domid: int) -> None:
    path = b"/local/domain/%d\0" % domid
    assert priv.req(Op.WRITE, path) == b"OK\0"
    assert priv.req(Op.SET_PERMS, path + b"n%d\0" % domid) == b"OK\0"


async def flood_never_read(path: str, payload_of: Callable[[int], bytes]) -> None:
    """Send requests as fast as the daemon takes them and never read a reply."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        i = 0
        while True:
            i += 1
            await stream.send_all(frame(Op.WRITE, payload_of(i), req_id=i))


async def hold_watches_and_transactions(path: str, watches: int, transactions: int) -> None:
    """Register the maximum of watches and transactions, then never read again."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        batch = b"".join(
            frame(Op.WATCH, b"/shared/w%d\0tok\0" % i, req_id=i) for i in range(watches)
        )
        batch += b"".join(frame(Op.TRANSACTION_START, b"\0", req_id=i) for i in range(transactions))
        batch += frame(Op.WATCH, b"/shared\0all\0")
        await stream.send_all(batch)
        await trio.sleep_forever()


async def deep_tree(path: str, domid: int) -> None:
    """Build a tree as deep as the node quota allows, then keep hitting the quota."""
    async with open_xenstore(path) as xs:
        level = f"/local/domain/{domid}"
        refused = 0
        for _ in range(3000):
            try:
                await xs.write(level + "/d", b"x" * 1000)
                level += "/d"
            except XsError as exc:
                assert exc.errno_name == "ENOSPC"
                refused += 1
        assert refused > 0


async def well_behaved(path: str, name: str, rounds: int) -> None:
    """Requests of every kind, each of which must complete within PROGRESS_LIMIT."""
    async with open_xenstore(path) as xs:
        for i in range(rounds):
            with trio.fail_after(PROGRESS_LIMIT):
                await xs.write(f"{name}/k{i % 7}", str(i))
                assert await xs.read(f"{name}/k{i % 7}") == str(i).encode()
                async with xs.transaction() as t:
                    await t.write(f"{name}/t", str(i))
                assert await xs.read(f"{name}/t") == str(i).encode()


async def test_flooding_guests_cannot_stall_others(start_daemon: Start) -> None:
    d = start_daemon("-W", "128", "-t", "10")
    priv = d.conn()
    for domid in (1, 2, 3, 4, 5):
        assert priv.req(Op.INTRODUCE, b"%d\x001\x001\0" % domid) == b"OK\0"
        home(priv, domid)
    assert priv.req(Op.WRITE, b"/shared\0") == b"OK\0"
    assert priv.req(Op.SET_PERMS, b"/shared\0n0\0r1\0r2\0r3\0r5\0") == b"OK\0"
    guest = {domid: str(RunDir(d.rundir).guest_socket(domid)) for domid in (1, 2, 3, 4, 5)}
    d.guest(5)  # waits for the guest sockets
    rss_before = vm_rss_kib(d.proc.pid)

    async with trio.open_nursery() as abuse:
        # Guest 1 floods writes and never reads; guest 2 floods reads of a missing node.
        abuse.start_soon(flood_never_read, guest[1], lambda i: b"k%d\0%s" % (i % 50, b"v" * 900))
        abuse.start_soon(flood_never_read, guest[1], lambda i: b"x%d\0" % (i % 3))
        abuse.start_soon(flood_never_read, guest[2], lambda i: b"/shared/nope%d\0" % i)
        # Guest 3 holds every watch and transaction it may and reads nothing.
        abuse.start_soon(hold_watches_and_transactions, guest[3], 128, 10)
        abuse.start_soon(hold_watches_and_transactions, guest[3], 128, 10)
        # Guest 4 builds deep trees up to its quota.
        abuse.start_soon(deep_tree, guest[4], 4)
        async with trio.open_nursery() as good:
            good.start_soon(well_behaved, str(d.socket), "/toolstack", 150)
            good.start_soon(well_behaved, guest[5], "/local/domain/5", 150)

            async def dom0_writes_shared() -> None:
                # Events for guest 3's watches, which it never reads.
                async with open_xenstore(d.socket) as xs:
                    for i in range(3000):
                        with trio.fail_after(PROGRESS_LIMIT):
                            await xs.write(f"/shared/w{i % 128}", b"e" * 200)

            good.start_soon(dom0_writes_shared)
        abuse.cancel_scope.cancel()

    assert d.proc.poll() is None
    growth = vm_rss_kib(d.proc.pid) - rss_before
    assert growth < RSS_GROWTH_KIB, f"daemon RSS grew by {growth} KiB"
    fresh = d.conn()
    assert fresh.req(Op.CONTROL, b"check\0") == b"OK\0"
    assert fresh.req(Op.READ, b"/toolstack/t\0") == b"149"


async def test_xsa_416_unread_replies_do_not_grow_memory(start_daemon: Start) -> None:
    d = start_daemon()
    priv = d.conn()
    assert priv.req(Op.INTRODUCE, b"1\x001\x001\0") == b"OK\0"
    home(priv, 1)
    assert priv.req(Op.WRITE, b"/local/domain/1/big\0" + b"z" * 2000) == b"OK\0"
    path = str(RunDir(d.rundir).guest_socket(1))
    d.guest(1)
    rss_before = vm_rss_kib(d.proc.pid)
    async with trio.open_nursery() as abuse:
        for _ in range(4):  # 2000-byte replies nobody reads
            abuse.start_soon(flood_never_read, path, lambda i: b"big\0" + b"z" * 2000)
        await well_behaved(str(d.socket), "/toolstack", 100)
        abuse.cancel_scope.cancel()
    growth = vm_rss_kib(d.proc.pid) - rss_before
    assert growth < RSS_GROWTH_KIB, f"daemon RSS grew by {growth} KiB"
    assert d.proc.poll() is None


async def test_xsa_326_outstanding_quota_stops_reading_a_guest(start_daemon: Start) -> None:
    # With an outstanding quota of 20, a guest that never reads gets at most that many replies
    # queued; then the daemon leaves its socket alone and others go on.
    d = start_daemon("-Q", "outstanding=20")
    priv = d.conn()
    assert priv.req(Op.INTRODUCE, b"1\x001\x001\0") == b"OK\0"
    home(priv, 1)
    path = str(RunDir(d.rundir).guest_socket(1))
    d.guest(1)
    stream = await trio.open_unix_socket(path)
    async with stream:
        sent = 0
        with trio.move_on_after(1):
            while True:
                sent += 1
                await stream.send_all(frame(Op.WRITE, b"n%d\0%s" % (sent, b"v" * 4000), sent))
        # The daemon stopped taking requests: only the socket buffers took more (unthrottled,
        # its replies would fill the kernel buffer and a 16384-message backlog first).
        assert sent < 3000, sent
        await well_behaved(str(d.socket), "/toolstack", 20)
        # Everything the guest sent is handled in order once it reads.
        got = 0
        buf = b""
        with trio.fail_after(PROGRESS_LIMIT * 3):
            while got < sent - 1:
                buf += await stream.receive_some(65536)
                while len(buf) >= 16:
                    _, req_id, _, n = HEADER.unpack_from(buf)
                    if len(buf) < 16 + n:
                        break
                    got += 1
                    assert req_id == got
                    buf = buf[16 + n :]


async def test_xsa_206_toolstack_transactions_commit_while_guest_floods(
    start_daemon: Start,
) -> None:
    d = start_daemon()
    priv = d.conn()
    assert priv.req(Op.INTRODUCE, b"1\x001\x001\0") == b"OK\0"
    home(priv, 1)
    d.guest(1)
    path = str(RunDir(d.rundir).guest_socket(1))

    async def busy_guest() -> None:
        # A guest that writes as fast as it can and does read its replies.
        async with open_xenstore(path) as xs:
            i = 0
            while True:
                i += 1
                await xs.write(f"k{i % 100}", b"v" * 500)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy_guest)
        nursery.start_soon(busy_guest)
        async with open_xenstore(d.socket) as xs:
            for i in range(100):
                with trio.fail_after(PROGRESS_LIMIT):
                    async with xs.transaction() as t:
                        await t.write("/vm/state", str(i))
                        await t.write("/vm/other", str(i))
            assert await xs.read("/vm/state") == b"99"
        nursery.cancel_scope.cancel()
    assert d.proc.poll() is None


def test_guest_exhausting_descriptors_cannot_crash_daemon(tmp_path: Path) -> None:
    # A guest opening connections until the daemon runs out of descriptors: accept() fails
    # with EMFILE, which must pause accepting, not end the daemon.
    rundir = tmp_path / "run"
    cmd = f"ulimit -n 128 && exec {shlex.quote(sys.executable)} -m xenstored_sim --rundir {rundir}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    proc = subprocess.Popen(["sh", "-c", cmd], env=env, stderr=subprocess.PIPE)
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while not RunDir(rundir).xenstored_socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        priv = socket.socket(socket.AF_UNIX)
        held.append(priv)
        priv.settimeout(5)
        priv.connect(str(RunDir(rundir).xenstored_socket))
        priv.sendall(frame(Op.INTRODUCE, b"1\x001\x001\0"))
        assert priv.recv(64)[16:] == b"OK\0"
        guest = RunDir(rundir).guest_socket(1)
        while not guest.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(0.5)
            held.append(s)
            try:
                s.connect(str(guest))
            except OSError:
                break
        time.sleep(0.5)
        assert proc.poll() is None
        priv.sendall(frame(Op.READ, b"/tool\0"))
        assert priv.recv(64)[16:] == b""  # an existing connection is still served
        for s in held[1:]:
            s.close()
        del held[1:]
        fresh = socket.socket(socket.AF_UNIX)
        held.append(fresh)
        fresh.settimeout(5)
        fresh.connect(str(RunDir(rundir).xenstored_socket))
        fresh.sendall(frame(Op.READ, b"/tool\0"))
        assert fresh.recv(64)[:4] == struct.pack("=I", Op.READ)
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        errors = proc.stderr.read().decode()
        proc.stderr.close()
    assert "Too many open files" not in errors, errors


def test_xsa_326_events_a_guest_causes_on_its_unread_connections_are_bounded(
    start_daemon: Start,
) -> None:
    # The guest's own writes fan out as large events to its other connections, which never
    # read: each write would otherwise keep 100 x 3.5 KB in the daemon.
    d = start_daemon()
    priv = d.conn()
    assert priv.req(Op.INTRODUCE, b"1\x001\x001\0") == b"OK\0"
    assert priv.req(Op.INTRODUCE, b"2\x001\x001\0") == b"OK\0"
    home(priv, 1)
    home(priv, 2)
    for i in range(100):
        watcher = d.guest(1)
        token = b"%04d" % i + b"t" * 3500
        assert watcher.req(Op.WATCH, b"/local/domain/1\0" + token + b"\0") == b"OK\0"
    writer = d.guest(1)
    other = d.guest(2)
    rss_before = vm_rss_kib(d.proc.pid)
    for i in range(1500):
        assert writer.req(Op.WRITE, b"k\0%d" % i) == b"OK\0"
    growth = vm_rss_kib(d.proc.pid) - rss_before
    assert growth < RSS_GROWTH_KIB, f"daemon RSS grew by {growth} KiB"
    assert other.req(Op.WRITE, b"still\0works") == b"OK\0"
    assert priv.req(Op.CONTROL, b"check\0") == b"OK\0"

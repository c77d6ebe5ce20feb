"""xenstored-sim as a real process: sockets, guest sockets, bad clients, audit log, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from xenhost import RunDir
from xenstored_sim.wire import Op

HEADER = struct.Struct("=IIII")


def test_sockets_modes_and_clean_stop(start_daemon) -> None:
    d = start_daemon()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    c = d.conn()
    assert c.req(Op.READ, b"/tool/xenstored\0") == b""
    assert c.req(Op.INTRODUCE, b"3\x001\x001\0") == b"OK\0"
    guest_path = RunDir(d.rundir).guest_socket(3)
    g = d.guest(3)
    assert stat.S_IMODE(os.stat(guest_path).st_mode) == 0o600
    assert g.req(Op.READ, b"/\0") == "EACCES"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(5) == 0
    assert not d.socket.exists() and not guest_path.exists()


def test_guest_socket_lifecycle_and_release(start_daemon) -> None:
    d = start_daemon()
    p = d.conn()
    assert p.req(Op.WATCH, b"@releaseDomain\0rel\0") == b"OK\0"
    assert p.event() == b"@releaseDomain\0rel\0"
    p.req(Op.INTRODUCE, b"4\x001\x001\0")
    p.req(Op.MKDIR, b"/local/domain/4\0")
    p.req(Op.SET_PERMS, b"/local/domain/4\0n4\0")
    g1, g2 = d.guest(4), d.guest(4)
    assert g1.req(Op.WRITE, b"data/x\0hello") == b"OK\0"
    assert g2.req(Op.READ, b"data/x\0") == b"hello"  # every connection is domain 4
    assert g2.req(Op.GET_PERMS, b"data/x\0") == b"n4\0"
    assert p.req(Op.RELEASE, b"4\0") == b"OK\0"
    assert p.events == [b"@releaseDomain\0rel\0"]
    for g in (g1, g2):
        with pytest.raises((ConnectionError, OSError)):
            g.req(Op.READ, b"data/x\0")
    assert p.req(Op.READ, b"/local/domain/4\0") == "ENOENT"  # XSA-419: owned nodes go
    deadline = time.monotonic() + 5
    while RunDir(d.rundir).guest_socket(4).exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # re-introduction serves a new socket, and the domain starts from nothing
    p.req(Op.INTRODUCE, b"4\x001\x001\0")
    assert d.guest(4).req(Op.READ, b"data/x\0") == "EACCES"


def test_bad_frames_hurt_only_their_connection(start_daemon) -> None:
    d = start_daemon()
    good = d.conn()
    bad = d.conn()
    bad.sock.sendall(HEADER.pack(Op.WRITE, 1, 0, 5000) + b"v" * 5000)
    with pytest.raises((ConnectionError, OSError)):
        bad.recv_msg()
    assert good.req(Op.WRITE, b"/still\0alive") == b"OK\0"
    odd = d.conn()
    for op, payload, answer in [
        (99, b"x\0", "ENOSYS"),
        (20, b"", "ENOSYS"),
        (Op.WATCH_EVENT, b"/x\0t\0", "ENOSYS"),
        (Op.ERROR, b"EINVAL\0", "ENOSYS"),
        (Op.SET_PERMS, b"/still\0q9\0", "EINVAL"),
        (Op.SET_PERMS, b"/still\0r\0", "EINVAL"),
        (Op.READ, b"/still\0extra\0", "EINVAL"),
        (Op.WRITE, b"/bad path\0v", "EINVAL"),
        (Op.DIRECTORY_PART, b"/still\0", "EINVAL"),
        (Op.READ, b"/still\0", b"alive"),
    ]:
        assert odd.req(op, payload) == answer
    # a frame split into single bytes still works
    raw = HEADER.pack(Op.READ, 77, 0, 7) + b"/still\0"
    for byte in raw:
        odd.sock.sendall(bytes([byte]))
    assert odd.recv_msg() == (Op.READ, 77, 0, b"alive")


def test_non_reading_clients_do_not_stall_others(start_daemon) -> None:
    d = start_daemon()
    p = d.conn()
    p.req(Op.INTRODUCE, b"8\x001\x001\0")
    p.req(Op.MKDIR, b"/local/domain/8\0")
    p.req(Op.SET_PERMS, b"/local/domain/8\0n8\0")
    # a privileged client that floods requests and never reads
    flood = d.conn()
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = HEADER.pack(Op.READ, 1, 0, 11) + b"/tool/xens\0"
    flood.sock.settimeout(0.5)
    sent = 0
    try:
        while sent < 50_000:
            flood.sock.send(request * 64)
            sent += 64
    except (TimeoutError, BlockingIOError):
        pass
    assert sent < 50_000  # the daemon stopped reading it
    # a guest watching everything it may see, never reading its events
    g = d.guest(8)
    g.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    g.send(Op.WATCH, b"/local/domain/8\0w\0")
    started = time.monotonic()
    for _i in range(300):
        assert p.req(Op.WRITE, b"/local/domain/8/k\0" + b"x" * 1000) == b"OK\0"
    assert p.req(Op.READ, b"/local/domain/8/k\0") == b"x" * 1000
    assert time.monotonic() - started < 10


def test_audit_log_records_principals_and_rules(start_daemon) -> None:
    d = start_daemon(audit=True)
    p = d.conn()
    p.req(Op.WRITE, b"/local/domain/0/device-model/1/physmap/f0000000/size\0" + b"800000")
    p.req(Op.INTRODUCE, b"2\x001\x001\0")
    g = d.guest(2)
    assert g.req(Op.READ, b"/local/domain/0/device-model/1/physmap\0") == "EACCES"
    assert g.req(Op.READ, b"/tool/none\0") == "EACCES"
    p.req(Op.SET_PERMS, b"/tool\0n0\0r2\0")
    assert g.req(Op.READ, b"/tool/none\0") == "ENOENT"
    tx = int(p.req(Op.TRANSACTION_START, b"\0")[:-1])
    p.req(Op.WRITE, b"/local/domain/0/t\0v", tx)
    p.req(Op.TRANSACTION_END, b"T\0", tx)
    records = [json.loads(line) for line in d.audit.read_text().splitlines()]
    assert all({"t", "conn", "domid", "priv", "op", "tx", "result"} <= r.keys() for r in records)
    write = next(r for r in records if r["op"] == "WRITE")
    assert write["path"] == "/local/domain/0/device-model/1/physmap/f0000000/size"
    assert write["priv"] is True and write["domid"] == 0 and write["rule"] == "privileged"
    assert write["pid"] == os.getpid() and write["guest"] is False
    ours = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    assert write["cmdline"] == [part.decode() for part in ours if part]
    reads = [r for r in records if r["op"] == "READ" and r["domid"] == 2]
    assert [(r["result"], r["rule"]) for r in reads] == [
        ("EACCES", "default:n"),
        ("EACCES", "ancestor-eacces"),
        ("ENOENT", "ancestor-enoent"),
    ]
    assert all(r["guest"] is True and r["priv"] is False for r in reads)
    intro = next(r for r in records if r["op"] == "INTRODUCE")
    assert intro["result"] == "OK"
    end = next(r for r in records if r["op"] == "TRANSACTION_END")
    assert end["tx"] == tx and "/local/domain/0/t" in end["paths"]
    assert [r["op"] for r in records].count("connect") >= 2


def test_cli_quota_flags_and_environment(start_daemon, tmp_path) -> None:
    sock = tmp_path / "elsewhere.sock"
    d = start_daemon(
        "-E", "3", "-Q", "watches=1", env={"XENSTORED_PATH": str(sock)}, socket_path=sock
    )
    assert not RunDir(d.rundir).xenstored_socket.exists()
    p = d.conn()
    assert b"nodes            :        3 Nodes" in p.req(Op.CONTROL, b"quota\0")
    p.req(Op.INTRODUCE, b"5\x001\x001\0")
    p.req(Op.MKDIR, b"/local/domain/5\0")
    p.req(Op.SET_PERMS, b"/local/domain/5\0n5\0")
    g = d.guest(5)
    assert [g.req(Op.WRITE, b"k%d\0v" % i) for i in range(3)] == [b"OK\0", b"OK\0", "ENOSPC"]
    assert [g.req(Op.WATCH, b"w%d\0t\0" % i) for i in range(3)] == [b"OK\0", b"OK\0", "E2BIG"]
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(5) == 0
    assert not sock.exists()

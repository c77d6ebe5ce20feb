"""Live update of a real daemon process with real clients connected (server/live_update.py).

The daemon must re-execute itself (same pid, new program image: its command line gains the
state flag and its update count grows) while every client keeps its connection, watches
keep firing, an open transaction commits, the store and its generations are unchanged,
quotas hold, and the state directory and the audit log carry on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from pyxs import Client

from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import Op

# The conftest's LiveDaemon and Wire; conftest is no module.
LiveDaemon = Any
STATE_FLAG = "--live-update-state"
LIMIT = 10


def walk(c: Any, path: str = "/") -> list[tuple[str, bytes, bytes, bytes]]:
    """Every node: value, permissions and the DIRECTORY_PART generation."""
    value = c.req(Op.READ, path.encode() + b"\0")
    perms = c.req(Op.GET_PERMS, path.encode() + b"\0")
    part = c.req(Op.DIRECTORY_PART, path.encode() + b"\x000\0")
    generation = part.split(b"\0", 1)[0]
    nodes = [(path, value, perms, generation)]
    children = c.req(Op.DIRECTORY, path.encode() + b"\0")
    for name in children.split(b"\0")[:-1]:
        child = (path.rstrip("/") + "/" + name.decode()) if path != "/" else "/" + name.decode()
        nodes.extend(walk(c, child))
    return nodes


def control(c: Any, *args: bytes) -> bytes | str:
    answer: bytes | str = c.req(Op.CONTROL, b"".join(a + b"\0" for a in args))
    return answer


def updates(c: Any) -> int:
    status = control(c, b"live-update")
    assert isinstance(status, bytes)
    line = next(x for x in status.decode().splitlines() if x.startswith("updates:"))
    return int(line.split()[1])


def audit_ops(daemon: LiveDaemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.audit.read_text().splitlines()]


async def test_clients_do_not_notice(
    live_daemon: LiveDaemon, connect: Any, socket_accepts: Any
) -> None:
    d = live_daemon
    pid = d.proc.pid
    admin = connect(d.socket)
    for i in range(3):
        assert admin.req(Op.WRITE, b"/data/n%d\0v%d" % (i, i)) == b"OK\0"
    assert admin.req(Op.MKDIR, b"/data/txd\0") == b"OK\0"
    assert control(admin, b"quota", b"set", b"nodes", b"77") == b"OK\0"
    assert admin.req(Op.INTRODUCE, b"5\x001\x001\0") == b"OK\0"
    assert admin.req(Op.MKDIR, b"/local/domain/5\0") == b"OK\0"
    assert admin.req(Op.SET_PERMS, b"/local/domain/5\0n5\0") == b"OK\0"
    assert updates(admin) == 0

    guest = connect(d.guest_socket(5))
    assert guest.req(Op.WRITE, b"mine\0g") == b"OK\0"
    assert guest.req(Op.WATCH, b"mine\0gtok\0") == b"OK\0"
    assert guest.event() == b"mine\0gtok\0"
    usage = control(admin, b"quota", b"5")

    txc = connect(d.socket)
    tx = int(txc.req(Op.TRANSACTION_START, b"\0")[:-1])
    assert txc.req(Op.READ, b"/data/n0\0", tx) == b"v0"
    assert txc.req(Op.WRITE, b"/data/txd/from-tx\0t", tx) == b"OK\0"

    pipelined = connect(d.socket)
    partial = pipelined.frame(Op.WRITE, b"/data/split\0across the update")

    async with open_xenstore(d.socket) as xs, xs.watch("/data", "trio") as events:
        assert (await events.receive()).path == "/data"
        before = walk(admin)

        # A request whose first half the old daemon reads and the new one finishes.
        pipelined.sock.sendall(partial[:20])
        # -s and a request pipelined behind it: the request is unread input of the
        # requester when the daemon re-executes.
        assert (
            control(
                admin,
                b"live-update",
                b"-f",
                str(Path(sys.executable).parent / "xenstored-sim").encode(),
            )
            == b"OK\0"
        )
        start = admin.frame(Op.CONTROL, b"live-update\0-s\0")
        start_id = admin.req_id
        after_start = admin.frame(Op.READ, b"/data/n1\0")
        admin.sock.sendall(start + after_start)
        assert admin.reply(start_id) == b"OK\0"  # answered by the new daemon
        assert admin.reply(admin.req_id) == b"v1"

        # Same process, new program image.
        assert d.proc.poll() is None and d.proc.pid == pid
        assert STATE_FLAG in d.cmdline()
        assert updates(admin) == 1
        assert walk(admin) == before
        assert control(admin, b"quota", b"5") == usage
        assert b"nodes            :       77" in control(admin, b"quota")

        pipelined.sock.sendall(partial[20:])
        assert pipelined.reply(pipelined.req_id) == b"OK\0"

        with trio.fail_after(LIMIT):
            assert await xs.read("/data/split") == b"across the update"
            assert (await events.receive()).path == "/data/split"
            await xs.write("/data/trio", "t")
            assert (await events.receive()).path == "/data/trio"

        # The transaction commits, its write fires the watch, its reads were not stale.
        assert txc.req(Op.READ, b"/data/txd/from-tx\0", tx) == b"t"
        assert txc.req(Op.TRANSACTION_END, b"T\0", tx) == b"OK\0"
        with trio.fail_after(LIMIT):
            assert (await events.receive()).path == "/data/txd/from-tx"
        assert admin.req(Op.READ, b"/data/txd/from-tx\0") == b"t"

        assert admin.req(Op.WRITE, b"/local/domain/5/mine\0h") == b"OK\0"
        assert guest.event() == b"mine\0gtok\0"
        assert guest.req(Op.READ, b"mine\0") == b"h"

    # Generations continue: a new write is numbered after everything before the update.
    top = max(int(g) for *_, g in before)
    assert admin.req(Op.WRITE, b"/data/n0\0w") == b"OK\0"
    gen = admin.req(Op.DIRECTORY_PART, b"/data/n0\x000\0").split(b"\0")[0]
    assert int(gen) > top

    # A transaction left open through the update still conflicts.
    tx2 = int(txc.req(Op.TRANSACTION_START, b"\0")[:-1])
    assert txc.req(Op.READ, b"/data/n2\0", tx2) == b"v2"
    assert control(admin, b"live-update") and control(admin, b"live-update", b"-c", b"") == b"OK\0"
    assert control(admin, b"live-update", b"-s", b"-F") == b"OK\0"  # default program
    assert updates(admin) == 2
    assert admin.req(Op.WRITE, b"/data/n2\0changed") == b"OK\0"
    assert txc.req(Op.TRANSACTION_END, b"T\0", tx2) == "EAGAIN"

    # The audit log and the journal carried on; a restart from the state directory sees it all.
    ops = audit_ops(d)
    assert any(r["op"] == "TRANSACTION_END" and r["result"] == "OK" for r in ops)
    assert any(r["op"] == "WRITE" and r.get("path") == "/data/trio" for r in ops)
    final = walk(admin)
    for c in (admin, guest, txc, pipelined):
        c.close()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(LIMIT) == 0
    assert not os.path.exists(d.socket)
    log = d.log.read_text()
    assert "Traceback" not in log, log
    restarted = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xenstored_sim",
            "--rundir",
            str(d.rundir),
            "--state-dir",
            str(d.state_dir),
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(LIMIT):
            while not socket_accepts(d.socket):
                await trio.sleep(0.02)
        again = connect(d.socket)
        assert [n[:3] for n in walk(again)] == [n[:3] for n in final]
        again.close()
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(LIMIT)


def test_real_xenstore_control_and_pyxs(
    live_daemon: LiveDaemon, xenstore_control: tuple[Path, str], connect: Any
) -> None:
    d = live_daemon
    binary, libs = xenstore_control
    env = {**d.env(), "LD_LIBRARY_PATH": libs}
    pid = d.proc.pid
    with Client(unix_socket_path=d.socket) as py:
        py.write(b"/py/a", b"1")
        with py.monitor() as mon:
            mon.watch(b"/py", b"pytok")
            assert next(mon.wait()) == (b"/py", b"pytok")
            admin = connect(d.socket)
            assert updates(admin) == 0

            # A binary that cannot be run: C's answer, and nothing changes.
            bad = subprocess.run(
                [str(binary), "live-update", "/nonexistent/xenstored"],
                env=env,
                capture_output=True,
                text=True,
                timeout=LIMIT,
            )
            assert bad.returncode == 3 and "Error activating new binary." in bad.stderr
            assert updates(admin) == 0 and STATE_FLAG not in d.cmdline()

            exe = str(Path(sys.executable).parent / "xenstored-sim")
            done = subprocess.run(
                [str(binary), "live-update", "-t", "5", exe],
                env=env,
                capture_output=True,
                text=True,
                timeout=LIMIT,
            )
            assert done.returncode == 0, done.stderr
            assert d.proc.pid == pid and d.proc.poll() is None
            assert updates(admin) == 1 and STATE_FLAG in d.cmdline()

            # pyxs's connections (its request socket and its monitor) survived.
            assert py.read(b"/py/a") == b"1"
            py.write(b"/py/b", b"2")
            assert next(mon.wait()) == (b"/py/b", b"pytok")
            admin.close()


def test_only_the_privileged_requester_may_update(live_daemon: LiveDaemon, connect: Any) -> None:
    d = live_daemon
    admin = connect(d.socket)
    other = connect(d.socket)
    assert admin.req(Op.INTRODUCE, b"4\x001\x001\0") == b"OK\0"
    guest = connect(d.guest_socket(4))
    assert control(guest, b"live-update", b"-s") == "EACCES"
    assert control(admin, b"live-update", b"-f", b"/bin/true") == b"OK\0"
    assert control(other, b"live-update", b"-f", b"/bin/true") == (
        b"live-update session already active.\0"
    )
    assert control(other, b"live-update", b"-s") == b"Not in live-update session.\0"
    assert control(admin, b"live-update", b"-s", b"-x") == "EINVAL"
    assert control(admin, b"live-update", b"-a") == b"OK\0"
    assert control(admin, b"live-update", b"-a") == b"Not in live-update session.\0"
    assert updates(admin) == 0 and STATE_FLAG not in d.cmdline()
    for c in (admin, other, guest):
        c.close()


def test_backlogged_client_loses_no_byte(live_daemon: LiveDaemon, connect: Any) -> None:
    """A guest that pipelines many large reads without reading has requests held back, unread
    input and unsent output when the daemon re-executes: every reply still arrives, in order."""
    d = live_daemon
    admin = connect(d.socket)
    assert admin.req(Op.INTRODUCE, b"6\x001\x001\0") == b"OK\0"
    big = bytes(range(256)) * 15
    assert admin.req(Op.WRITE, b"/big\0" + big) == b"OK\0"
    assert admin.req(Op.SET_PERMS, b"/big\0n0\0r6\0") == b"OK\0"
    guest = connect(d.guest_socket(6))
    count = 300
    guest.sock.sendall(b"".join(guest.frame(Op.READ, b"/big\0") for _ in range(count)))
    # The guest's queue fills up to its outstanding quota: its reader then holds a request.
    status = control(admin, b"live-update")
    assert isinstance(status, bytes)
    assert (
        control(
            admin,
            b"live-update",
            b"-f",
            str(Path(sys.executable).parent / "xenstored-sim").encode(),
        )
        == b"OK\0"
    )
    assert control(admin, b"live-update", b"-s") == b"OK\0"
    assert updates(admin) == 1
    for req_id in range(1, count + 1):
        assert guest.reply(req_id) == big

"""hypervisor-sim as a real process, driven through the trio client and raw sockets."""

from __future__ import annotations

import errno
import faulthandler
import hashlib
import json
import os
import pathlib
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import trio

from hypervisor_sim import vma
from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected, Ioreq, pack
from hypervisor_sim.xenforeignmemory import ForeignMemory
from xenhost import RunDir

PAGE = 4096


async def _ready_domain(hv_path: pathlib.Path, pages: int = 16) -> int:
    async with open_hypervisor(hv_path) as hv:
        domid = await hv.domain_create("guest", max_pages=pages)
        await hv.populate_physmap(domid, range(pages))
        await hv.domain_unpause(domid)
        return domid


async def test_version_and_domain_lifecycle(hypervisor: Any) -> None:
    async with open_hypervisor(hypervisor.sock) as hv:
        assert await hv.version() == {"xen": "4.17", "libs": "4.17", "has_map2": True}
        domid = await hv.domain_create("vm1", max_pages=64)
        assert domid == 1
        info = await hv.domain_getinfo(domid)
        assert info == {
            "domid": 1,
            "name": "vm1",
            "paused": True,
            "tot_pages": 0,
            "max_pages": 64,
            "hvm": True,
            "cpu_time": 0,  # created paused: its vCPUs have not run
        }
        assert await hv.populate_physmap(domid, [0, 1, 2, 10]) == 4
        assert await hv.p2m(domid) == [(0, 3), (10, 1)]
        with pytest.raises(HypercallError) as exc:
            await hv.populate_physmap(domid, [2])
        assert exc.value.errno_name == "EEXIST"
        await hv.domain_unpause(domid)
        assert [d["paused"] for d in await hv.domain_list()] == [False]
        assert RunDir(hypervisor.rundir).guest_memory(1).exists()
        await hv.domain_destroy(domid)
        assert await hv.domain_list() == []
        assert not RunDir(hypervisor.rundir).guest_memory(1).exists()
        with pytest.raises(HypercallError) as exc:
            await hv.domain_getinfo(domid)
        assert exc.value.errno_name == "ESRCH"
        assert await hv.domain_create("vm2", max_pages=1) == 2


async def test_old_libraries_have_no_map2(spawn: Callable[..., Any]) -> None:
    d = spawn("--xen-libs", "4.9")
    async with open_hypervisor(d.sock) as hv:
        assert await hv.version() == {"xen": "4.17", "libs": "4.9", "has_map2": False}


_MAPPER = """
import sys
from hypervisor_sim import vma
from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.xenforeignmemory import ForeignMemory
sock, domid, gfn, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with Privcmd(sock) as p:
    fm = ForeignMemory(p)
    va, errs = fm.map2(domid, None, vma.PROT_RW, 0, [gfn])
    assert errs == [0], errs
    before = vma.read(va, 16)
    vma.write(va + 100, text.encode())
    fm.unmap(va, 1)
print(before.hex())
"""


async def test_two_processes_share_a_foreign_mapping(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock)
    async with open_hypervisor(hypervisor.sock) as hv:
        await hv.guest(domid, [{"op": "mem_write", "gpa": 3 * PAGE, "data": b"from the guest!!"}])
    with Privcmd(hypervisor.sock) as p:
        fm = ForeignMemory(p)
        va, errs = fm.map2(domid, None, vma.PROT_RW, 0, [2, 3, 4])
        try:
            assert errs == [0, 0, 0]
            assert vma.read(va + PAGE, 16) == b"from the guest!!"
            proc = await trio.run_process(
                [sys.executable, "-c", _MAPPER, str(hypervisor.sock), str(domid), "3", "hello"],
                capture_stdout=True,
            )
            # The other process saw the guest's bytes, and we see what it wrote.
            assert bytes.fromhex(proc.stdout.decode().strip()) == b"from the guest!!"
            assert vma.read(va + PAGE + 100, 5) == b"hello"
        finally:
            fm.unmap(va, 3)
    async with open_hypervisor(hypervisor.sock) as hv:
        [got] = await hv.guest(domid, [{"op": "mem_read", "gpa": 3 * PAGE + 100, "len": 5}])
        assert got == b"hello"


async def test_relocation_moves_the_mapping_not_the_data(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock, pages=8)
    data = os.urandom(4 * PAGE)
    bar = 0xF0000  # gfn of a BAR at 0xf0000000
    async with open_hypervisor(hypervisor.sock) as hv:
        await hv.guest(domid, [{"op": "mem_write", "gpa": 4 * PAGE, "data": data}])
        with Privcmd(hypervisor.sock) as p:
            fm = ForeignMemory(p)
            old_va, _ = fm.map2(domid, None, vma.PROT_RW, 0, [4, 5, 6, 7])
            await hv.relocate_memory(domid, 4, bar, 4)
            assert await hv.p2m(domid) == [(0, 4), (bar, 4)]
            new_va, errs = fm.map2(domid, None, vma.PROT_RW, 0, [bar, bar + 1, bar + 2, bar + 3])
            assert errs == [0, 0, 0, 0]
            assert vma.read(new_va, 4 * PAGE) == data
            # The same frames: a write through the old mapping shows through the new one.
            vma.write(old_va, b"\x55" * 8)
            assert vma.read(new_va, 8) == b"\x55" * 8
            gone_va, errs = fm.map2(domid, None, vma.PROT_RW, 0, [4, 0])
            assert errs == [-errno.EINVAL, 0]
            assert vma.read(gone_va + PAGE, 8) == bytes(8)  # gfn 0 mapped
            # A failed page of a privcmd mapping raises SIGBUS on access.
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child dies on the read
                faulthandler.disable()  # the expected SIGBUS is not a crash to report
                vma.read(gone_va, 1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
            for va in (old_va, new_va):
                fm.unmap(va, 4)
            fm.unmap(gone_va, 2)
        digest = await hv.guest(domid, [{"op": "mem_sha256", "gpa": bar * PAGE, "len": 8}])
        assert digest == [hashlib.sha256(b"\x55" * 8).hexdigest()]
        await hv.add_to_physmap(domid, idx=bar, gpfn=4)
        assert await hv.p2m(domid) == [(0, 5), (bar + 1, 3)]


async def test_map2_fixed_replaces_a_dummy_in_place(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock, pages=4)
    async with open_hypervisor(hypervisor.sock) as hv:
        await hv.guest(domid, [{"op": "mem_write", "gpa": 0, "data": b"real"}])
    dummy = vma.map_anonymous(2 * PAGE)
    with Privcmd(hypervisor.sock) as p:
        fm = ForeignMemory(p)
        va, errs = fm.map2(domid, dummy, vma.PROT_RW, vma.MAP_FIXED, [0, 1])
        assert (va, errs) == (dummy, [0, 0])
        assert vma.read(dummy, 4) == b"real"
        fm.unmap(va, 2)


async def test_ioreq_round_trip_with_hypercalls_while_pending(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock)
    async with open_hypervisor(hypervisor.sock) as dm, open_hypervisor(hypervisor.sock) as tool:
        server_id = await dm.ioreq_server_create(domid)
        seen: list[Ioreq] = []

        async def device_model() -> None:
            async for ioreq in dm.ioreqs():
                seen.append(ioreq)
                if ioreq.type == "pci_config" and ioreq.dir == "write":
                    # The device model may call the hypervisor while the access waits.
                    await dm.populate_physmap(domid, [0x1000])
                    await dm.relocate_memory(domid, 0x1000, 0xF0000, 1)
                await dm.ioreq_complete(ioreq.seq, 0x11111234 if ioreq.dir == "read" else 0)
                if len(seen) == 4:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_model)
            results = await tool.guest(
                domid,
                [
                    {
                        "op": "pci_cfg_write",
                        "sbdf": 0x10,
                        "reg": 0x10,
                        "size": 4,
                        "value": 0xF0000000,
                    },
                    {"op": "pci_cfg_read", "sbdf": 0x10, "reg": 0x0, "size": 2},
                    {"op": "pio_read", "port": 0x1CF, "size": 2},
                    {"op": "mmio_write", "gpa": 0xE0000000, "size": 4, "value": 7},
                ],
            )
        assert results == [None, 0x1234, 0x1234, None]
        assert [(r.type, r.dir) for r in seen] == [
            ("pci_config", "write"),
            ("pci_config", "read"),
            ("pio", "read"),
            ("copy", "write"),
        ]
        assert (seen[0].sbdf, seen[0].reg, seen[0].size, seen[0].data) == (
            0x10,
            0x10,
            4,
            0xF0000000,
        )
        assert (seen[3].addr, seen[3].data) == (0xE0000000, 7)
        assert (0xF0000, 1) in await tool.p2m(domid)
        await dm.ioreq_server_destroy(domid, server_id)
        assert await tool.guest(domid, [{"op": "pio_read", "port": 0x1CF, "size": 2}]) == [0xFFFF]


async def test_without_a_device_model_reads_are_all_ones(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock, pages=1)
    async with open_hypervisor(hypervisor.sock) as hv:
        results = await hv.guest(
            domid,
            [
                {"op": "pci_cfg_read", "sbdf": 0x10, "reg": 0, "size": 4},
                {"op": "mmio_write", "gpa": 0x2000, "size": 8, "value": 1},
                {"op": "mmio_read", "gpa": 0x2000, "size": 8},
                {"op": "mem_read", "gpa": PAGE - 2, "len": 4},
                {"op": "mmio_write", "gpa": 0x10, "size": 2, "value": 0xBEEF},
                {"op": "mmio_read", "gpa": 0x10, "size": 2},
            ],
        )
        assert results == [0xFFFFFFFF, None, 2**64 - 1, b"\0\0\xff\xff", None, 0xBEEF]


async def test_a_vanished_device_model_never_hangs_the_guest(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock)
    async with open_hypervisor(hypervisor.sock) as tool:
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def guest() -> None:
                got.extend(await tool.guest(domid, [{"op": "pio_read", "port": 0x3C5, "size": 1}]))

            async with open_hypervisor(hypervisor.sock) as dm:
                await dm.ioreq_server_create(domid)
                nursery.start_soon(guest)
                async for ioreq in dm.ioreqs():
                    assert ioreq.addr == 0x3C5
                    break  # leave without completing: the connection closes
        assert got == [0xFF]


async def test_restricted_connection_gets_eperm(hypervisor: Any) -> None:
    d1 = await _ready_domain(hypervisor.sock, pages=2)
    d2 = await _ready_domain(hypervisor.sock, pages=2)
    with Privcmd(hypervisor.sock) as p:
        fm = ForeignMemory(p)
        p.restrict(d1)
        va, errs = fm.map2(d1, None, vma.PROT_RW, 0, [0, 1])
        assert errs == [0, 0]
        fm.unmap(va, 2)
        with pytest.raises(OSError) as exc:
            fm.map2(d2, None, vma.PROT_RW, 0, [0])
        assert exc.value.errno == errno.EPERM
        for call, args in [("domain_list", {}), ("domain_create", {"name": "x", "max_pages": 1})]:
            with pytest.raises(HypercallError) as herr:
                p.call(call, **args)
            assert herr.value.errno_name == "EPERM"
        with pytest.raises(HypercallError) as herr:
            p.restrict(d2)
        assert herr.value.errno_name == "EINVAL"
        assert p.version()["has_map2"] is True
    async with open_hypervisor(hypervisor.sock) as hv:  # other connections are not restricted
        assert len(await hv.domain_list()) == 2


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _read_frame(s: socket.socket) -> dict[str, object]:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        assert chunk, "connection closed"
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    reply = msgpack.unpackb(body, raw=False)
    assert isinstance(reply, dict)
    return reply


def test_malformed_frames_get_clear_errors(hypervisor: Any) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.fspath(hypervisor.sock))
        s.settimeout(10)
        cases: list[tuple[bytes, object, str, str]] = [
            (struct.pack(">I", 3) + b"\xc1\xc1\xc1", None, "EINVAL", "not msgpack"),
            (_frame([1, 2]), None, "EINVAL", "not a map"),
            (_frame({"call": "version"}), None, "EINVAL", "id"),
            (_frame({"id": 7}), 7, "EINVAL", "call"),
            (_frame({"id": 8, "call": "nope"}), 8, "ENOSYS", "nope"),
            (_frame({"id": 9, "call": "domain_getinfo", "args": {}}), 9, "EINVAL", "domid"),
            (
                _frame({"id": 10, "call": "domain_getinfo", "args": {"domid": "1"}}),
                10,
                "EINVAL",
                "domid",
            ),
            (
                _frame(
                    {"id": 11, "call": "populate_physmap", "args": {"domid": 1, "gfns": [True]}}
                ),
                11,
                "EINVAL",
                "gfns",
            ),
            (
                _frame({"id": 12, "call": "guest", "args": {"domid": 99, "ops": []}}),
                12,
                "ESRCH",
                "99",
            ),
            (_frame({"id": 13, "call": "version", "args": {"x": 1}}), 13, "EINVAL", "x"),
        ]
        for frame, rid, err, word in cases:
            s.sendall(frame)
            reply = _read_frame(s)
            assert (reply["id"], reply["error"]) == (rid, err), reply
            assert word in str(reply["message"])
        s.sendall(pack({"id": 14, "call": "version", "args": {}}))
        assert _read_frame(s)["result"] == {"xen": "4.17", "libs": "4.17", "has_map2": True}
        # An impossible length cannot be framed past: only this connection is closed.
        s.sendall(struct.pack(">I", 0xFFFFFFF0) + b"x" * 10)
        reply = _read_frame(s)
        assert (reply["id"], reply["error"]) == (None, "E2BIG")
        assert s.recv(1) == b""
    with Privcmd(hypervisor.sock) as p:
        assert p.version()["libs"] == "4.17"


async def test_guest_op_errors_name_the_failing_op(hypervisor: Any) -> None:
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await hv.domain_create("g", max_pages=1)
        await hv.populate_physmap(domid, [0])
        with pytest.raises(HypercallError) as exc:
            await hv.guest(domid, [{"op": "mem_read", "gpa": 0, "len": 1}])
        assert exc.value.errno_name == "EBUSY"
        assert "paused" in exc.value.message
        await hv.domain_unpause(domid)
        with pytest.raises(HypercallError) as exc:
            await hv.guest(
                domid,
                [
                    {"op": "mem_write", "gpa": 0, "data": b"a"},
                    {"op": "pio_read", "port": 0x1CE, "size": 3},
                    {"op": "mem_write", "gpa": 0, "data": b"b"},
                ],
            )
        assert exc.value.errno_name == "EINVAL"
        assert "ops[1] pio_read" in exc.value.message and "size 3" in exc.value.message
        # The batch stopped at the failing op.
        assert await hv.guest(domid, [{"op": "mem_read", "gpa": 0, "len": 1}]) == [b"a"]
        for bad in ({"op": "fly"}, {"gpa": 0}, {"op": "mem_read", "gpa": -1, "len": 1}):
            with pytest.raises(HypercallError) as exc:
                await hv.guest(domid, [bad])
            assert exc.value.errno_name == "EINVAL"


async def test_xenstore_op_without_a_guest_socket(hypervisor: Any) -> None:
    domid = await _ready_domain(hypervisor.sock, pages=1)
    async with open_hypervisor(hypervisor.sock) as hv:
        with pytest.raises(HypercallError) as exc:
            await hv.guest(domid, [{"op": "xs_read", "path": "data/x"}])
        assert exc.value.errno_name == "ENOENT"
        assert f"domains/{domid}.sock" in exc.value.message


async def test_audit_log_names_the_caller(hypervisor: Any) -> None:
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await hv.domain_create("audited", max_pages=1)
        with pytest.raises(HypercallError):
            await hv.domain_pause(domid + 1)
        await hv.domain_unpause(domid)
        await hv.guest(domid, [{"op": "pio_read", "port": 0x80, "size": 1}])
    records = [json.loads(line) for line in hypervisor.audit.read_text().splitlines()]
    calls = [(r["call"], r["domid"], r["result"]) for r in records]
    assert calls == [
        ("domain_create", None, "ok"),
        ("domain_pause", domid + 1, "ESRCH"),
        ("domain_unpause", domid, "ok"),
        ("guest_op", domid, "ok"),
        ("guest", domid, "ok"),
    ]
    assert records[0]["peer"]["pid"] == os.getpid()
    assert records[0]["peer"]["cmdline"][:1] == [sys.executable] or records[0]["peer"]["cmdline"]
    assert all(isinstance(r["t"], float) for r in records)


async def test_client_waiters_fail_when_the_hypervisor_goes(spawn: Callable[..., Any]) -> None:
    d = spawn()
    async with open_hypervisor(d.sock) as hv:
        domid = await hv.domain_create("g", max_pages=1)
        await hv.domain_unpause(domid)
        await hv.ioreq_server_create(domid)  # nobody answers: the guest op waits
        failures: list[BaseException] = []

        async def waiting_guest_op() -> None:
            try:
                await hv.guest(domid, [{"op": "pio_read", "port": 1, "size": 1}])
            except HypervisorDisconnected as exc:
                failures.append(exc)

        async def waiting_ioreqs() -> None:
            try:
                async for _ in hv.ioreqs():
                    d.stop()
            except HypervisorDisconnected as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting_ioreqs)
            nursery.start_soon(waiting_guest_op)
        assert len(failures) == 2
        with pytest.raises(HypervisorDisconnected):
            await hv.version()


def test_sigterm_removes_socket_and_memory_files(spawn: Callable[..., Any]) -> None:
    d = spawn()
    with Privcmd(d.sock) as p:
        for _ in range(2):
            domid = p.call("domain_create", name="g", max_pages=8)["domid"]
            p.call("populate_physmap", domid=domid, gfns=list(range(8)))
    assert len(list(RunDir(d.rundir).memory_dir.iterdir())) == 2
    assert d.stop() == 0
    assert not d.sock.exists()
    assert list(RunDir(d.rundir).memory_dir.iterdir()) == []


async def test_a_sequence_runs_in_order_and_stops_at_the_first_failure(hypervisor: Any) -> None:
    """The device model's per-page XENMAPSPACE_gmfn loop (QEMU 2.10 xen_add_to_physmap) in one
    round trip: the pages before a failure have moved, the ones after have not."""
    domid = await _ready_domain(hypervisor.sock, pages=8)
    moves = [(4, 0x100), (5, 0x101), (0x50, 0x102), (6, 0x103)]
    calls = [
        ("add_to_physmap", {"domid": domid, "space": "gmfn", "idx": i, "gpfn": g}) for i, g in moves
    ]
    with Privcmd(hypervisor.sock) as p:
        with pytest.raises(HypercallError, match=r"call 2 of 4") as exc:
            p.sequence(calls)
        assert exc.value.errno_name == "EINVAL"
        assert p.p2m(domid) == [(0, 4), (6, 2), (0x100, 2)]
        assert p.sequence(calls[3:]) == 1
        with pytest.raises(HypercallError, match="not \\[call"):
            p.call("sequence", calls=[["guest", {"domid": domid, "ops": []}]])

"""The audit-log reader: hand-written records in the daemons' formats, and a real log written by
a running xenstored-sim for requests from processes that are, by their command lines, the
toolstack, a device model and a guest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from physmap_lab.auditlog import (
    AuditFormatError,
    PathClass,
    Principal,
    XenstoreAudit,
    classify_path,
    classify_peer,
    iter_jsonl,
    parse_hypercall,
    parse_toolstack,
    parse_xenstored,
    read_jsonl,
    read_xenstored,
)
from physmap_lab.stack import Daemon, start_daemon, stop_daemon, xenstored_command
from xenhost import RunDir
from xenstored_sim.client import open_xenstore

VENV = "/venv/bin"
XL = [f"{VENV}/python", f"{VENV}/xl-sim", "--rundir", "/run/x", "--json", "create"]
QEMU = [f"{VENV}/python", f"{VENV}/qemu-model", "--domid", "7", "--xen-mode", "compat"]
HV = [f"{VENV}/python", f"{VENV}/hypervisor-sim", "--rundir", "/run/x"]
PHYSMAP = "/local/domain/0/device-model/7/physmap/1f00000"


def xs(
    op: str,
    path: str | None = None,
    *,
    cmdline: list[str] = XL,
    priv: bool = True,
    domid: int = 0,
    result: str = "OK",
    **extra: Any,
) -> dict[str, Any]:
    """A record as xenstored-sim writes it: the request's fields, then the peer's."""
    rec: dict[str, Any] = {
        "t": 1.5,
        "conn": 3,
        "domid": domid,
        "priv": priv,
        "op": op,
        "tx": 0,
        "result": result,
    }
    if path is not None:
        rec["path"] = path
    rec.update(extra)
    rec.update({"pid": 42, "uid": 0, "cmdline": cmdline, "guest": not priv})
    return rec


def guest(op: str, path: str, result: str = "OK") -> dict[str, Any]:
    return xs(op, path, cmdline=HV, priv=False, domid=7, result=result)


# ------------------------------------------------------------------------------- principals


@pytest.mark.parametrize(
    ("cmdline", "guest_socket", "expected"),
    [
        (XL, False, Principal.TOOLSTACK),
        (["xl-sim", "save", "3", "/tmp/img"], False, Principal.TOOLSTACK),
        (["/usr/bin/python3.11", "-u", "-m", "toolstack.cli", "list"], False, Principal.TOOLSTACK),
        (["/usr/local/bin/physmap-lab", "demo"], False, Principal.TOOLSTACK),
        (QEMU, False, Principal.DEVICE_MODEL),
        (["qemu-model", "--domid=3"], False, Principal.DEVICE_MODEL),
        (["python3", "-m", "qemu_model", "--domid", "3"], False, Principal.DEVICE_MODEL),
        # A device model the toolstack did not start for a domain is nobody we know.
        (["qemu-model", "--help"], False, Principal.OTHER),
        (HV, True, Principal.GUEST),
        # The guest socket decides, whoever carries the connection.
        (XL, True, Principal.GUEST),
        (HV, False, Principal.OTHER),
        (["xenstore-write", "/local/domain/0/x", "1"], False, Principal.OTHER),
        # A name that only appears as an argument does not make the toolstack.
        (["xenstore-read", "xl-sim"], False, Principal.OTHER),
        ([], False, Principal.OTHER),
    ],
)
def test_classify_peer(cmdline: list[str], guest_socket: bool, expected: Principal) -> None:
    assert classify_peer(cmdline, guest=guest_socket) is expected


def test_a_device_models_domid_comes_from_its_command_line() -> None:
    assert parse_xenstored(xs("WRITE", PHYSMAP, cmdline=QEMU)).peer.dm_domid == 7
    assert parse_xenstored(xs("WRITE", PHYSMAP, cmdline=XL)).peer.dm_domid is None


# ------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("path", "kind", "domid"),
    [
        (f"{PHYSMAP}/start_addr", PathClass.PHYSMAP, 7),
        ("/local/domain/0/device-model/7/physmap", PathClass.PHYSMAP, 7),
        ("/local/domain/0/device-model/12/state", PathClass.DM_STATE, 12),
        ("/local/domain/0/device-model/12/state/x", PathClass.DEVICE_MODEL, 12),
        ("/local/domain/0/device-model/12", PathClass.DEVICE_MODEL, 12),
        ("/local/domain/0/device-model/12/physmapx", PathClass.DEVICE_MODEL, 12),
        ("/local/domain/0/device-model/12/backends/console", PathClass.DEVICE_MODEL, 12),
        ("/local/domain/7/device/vfb", PathClass.GUEST_TREE, 7),
        ("/local/domain/7", PathClass.GUEST_TREE, 7),
        ("/local/domain/0/name", PathClass.OTHER, None),
        ("/vm/00000000-0000-0000-0000-000000000001", PathClass.OTHER, None),
        ("@introduceDomain", PathClass.OTHER, None),
        ("/local/domain/0/device-model", PathClass.OTHER, None),
    ],
)
def test_classify_path(path: str, kind: PathClass, domid: int | None) -> None:
    info = classify_path(path)
    assert (info.kind, info.domid) == (kind, domid)


def test_a_stub_domain_device_model_path_names_its_domain() -> None:
    info = classify_path("/local/domain/5/device-model/7/physmap/1f00000/size")
    assert (info.kind, info.domid, info.dm_domid) == (PathClass.PHYSMAP, 7, 5)
    # A stub device model's readiness node, in the stub's own tree (docs/qemu-physmap.md, 'Start-up
    # and readiness', 'Stub domains').
    info = classify_path("/local/domain/5/device-model/7/state")
    assert (info.kind, info.domid, info.dm_domid) == (PathClass.DM_STATE, 7, 5)


@given(
    dm=st.integers(0, 2**16),
    domid=st.integers(1, 2**16),
    offset=st.integers(0, 2**64 - 1),
    key=st.sampled_from(["start_addr", "size", "name"]),
)
def test_every_physmap_key_is_a_physmap_path(dm: int, domid: int, offset: int, key: str) -> None:
    # docs/qemu-physmap.md, 'The keys': decimal domid, hex phys_offset without 0x.
    info = classify_path(f"/local/domain/{dm}/device-model/{domid}/physmap/{offset:x}/{key}")
    assert (info.kind, info.domid, info.dm_domid) == (PathClass.PHYSMAP, domid, dm)


# -------------------------------------------------------------------------------- parsing


def test_parse_xenstored_keeps_the_fields() -> None:
    r = parse_xenstored(xs("WRITE", f"{PHYSMAP}/size", cmdline=QEMU, rule="privileged", tx=4))
    assert (r.conn, r.domid, r.priv, r.op, r.tx, r.result, r.rule) == (
        3,
        0,
        True,
        "WRITE",
        4,
        "OK",
        "privileged",
    )
    assert r.paths == (f"{PHYSMAP}/size",)
    assert (r.peer.pid, r.peer.program, r.principal) == (42, "qemu-model", Principal.DEVICE_MODEL)
    assert r.ok and not r.denied and r.is_request


def test_a_committed_transaction_carries_every_path_it_changed() -> None:
    rec = xs("TRANSACTION_END", paths=[f"{PHYSMAP}/size", "/local/domain/7/name"], tx=2)
    r = parse_xenstored(rec)
    assert r.paths == (f"{PHYSMAP}/size", "/local/domain/7/name")
    assert r.path_classes == {PathClass.PHYSMAP, PathClass.GUEST_TREE}
    assert r.touches(PathClass.PHYSMAP, 7) and not r.touches(PathClass.PHYSMAP, 8)


def test_an_unprivileged_record_without_a_guest_flag_is_a_guest_connection() -> None:
    rec = guest("READ", PHYSMAP, "EACCES")
    del rec["guest"]
    r = parse_xenstored(rec)
    assert r.principal is Principal.GUEST and r.denied and not r.ok


@pytest.mark.parametrize(
    "change",
    [
        {"op": None},
        {"priv": "yes"},
        {"conn": True},
        {"path": 5},
        {"paths": ["/a", 3]},
        {"cmdline": "xl-sim create"},
        {"t": "now"},
    ],
)
def test_a_malformed_xenstored_record_is_refused(change: dict[str, Any]) -> None:
    rec = xs("WRITE", PHYSMAP)
    for key, value in change.items():
        if value is None:
            del rec[key]
        else:
            rec[key] = value
    with pytest.raises(AuditFormatError):
        parse_xenstored(rec)


def test_iter_jsonl_names_the_bad_line() -> None:
    good = json.dumps(xs("READ", "/a"))
    it = iter_jsonl([good, "", "{not json"], source="x.jsonl")
    assert next(it)["op"] == "READ"
    with pytest.raises(AuditFormatError, match=r"x\.jsonl:3: not JSON"):
        next(it)
    with pytest.raises(AuditFormatError, match=r"x\.jsonl:2: a list"):
        list(iter_jsonl([good, "[1]"], source="x.jsonl"))


def test_read_jsonl_leaves_out_a_line_still_being_written(tmp_path: Path) -> None:
    log = tmp_path / "xenstored.jsonl"
    whole = json.dumps(xs("READ", "/a")) + "\n"
    log.write_text(whole + whole[:20])
    assert [r["op"] for r in read_jsonl(log)] == ["READ"]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_parse_hypercall_and_guest_op() -> None:
    call = parse_hypercall(
        {
            "t": 2.0,
            "conn": 1,
            "peer": {"pid": 9, "cmdline": QEMU},
            "call": "map_foreign",
            "domid": 7,
            "result": "ok",
        }
    )
    assert (call.call, call.domid, call.principal) == ("map_foreign", 7, Principal.DEVICE_MODEL)
    op = parse_hypercall(
        {
            "t": 2.0,
            "conn": None,
            "peer": None,
            "call": "guest_op",
            "op": "mem_fill",
            "domid": 7,
            "result": "ok",
        }
    )
    assert (op.op, op.principal) == ("mem_fill", Principal.GUEST)
    with pytest.raises(AuditFormatError):
        parse_hypercall({"t": 2.0, "call": "version"})


def test_parse_toolstack() -> None:
    r = parse_toolstack(
        {
            "t": 3.0,
            "command": "restore",
            "action": "xs_write",
            "path": f"{PHYSMAP}/size",
            "domid": 7,
            "result": "ok",
            "pid": 11,
        }
    )
    assert (r.command, r.action, r.path, r.domid, r.ok) == (
        "restore",
        "xs_write",
        f"{PHYSMAP}/size",
        7,
        True,
    )
    with pytest.raises(AuditFormatError):
        parse_toolstack({"t": 3.0, "command": "restore", "result": "ok"})


# ------------------------------------------------------------------------------- queries


def _compat_restore() -> XenstoreAudit:
    """The requests of a compat restore of domain 7 and a curious guest, as the log has them."""
    records = [
        xs("connect", cmdline=XL),
        xs("MKDIR", "/local/domain/0/device-model/7", cmdline=XL),
        xs("WRITE", f"{PHYSMAP}/start_addr", cmdline=XL),
        xs("WRITE", f"{PHYSMAP}/size", cmdline=XL),
        xs("WRITE", f"{PHYSMAP}/name", cmdline=XL),
        xs("disconnect", cmdline=XL),
        xs("DIRECTORY", "/local/domain/0/device-model/7/physmap", cmdline=QEMU),
        xs("READ", f"{PHYSMAP}/start_addr", cmdline=QEMU),
        xs("READ", f"{PHYSMAP}/size", cmdline=QEMU),
        xs("READ", f"{PHYSMAP}/name", cmdline=QEMU),
        xs("WRITE", "/local/domain/0/device-model/7/state", cmdline=QEMU),
        guest("READ", f"{PHYSMAP}/start_addr", "EACCES"),
        guest("WRITE", "/local/domain/7/data/x"),
        # Another domain's keys.
        xs("WRITE", "/local/domain/0/device-model/8/physmap/1f00000/size", cmdline=XL),
    ]
    return XenstoreAudit(parse_xenstored(r) for r in records)


def test_count_by_principal_leaves_out_connection_events() -> None:
    log = _compat_restore()
    assert len(log.where(requests_only=False)) == 14
    assert log.where().count("principal") == Counter(
        {Principal.TOOLSTACK: 5, Principal.DEVICE_MODEL: 5, Principal.GUEST: 2}
    )


def test_physmap_ops_per_principal_for_one_domain() -> None:
    log = _compat_restore()
    assert log.physmap_ops(about=7) == {"toolstack": 3, "device-model": 4, "guest": 1}
    assert log.physmap_ops(about=[8]) == {"toolstack": 1, "device-model": 0, "guest": 0}
    assert log.physmap_ops(about=[99]) == {"toolstack": 0, "device-model": 0, "guest": 0}
    assert sum(log.physmap_ops().values()) == 9


def test_where_and_count_combine() -> None:
    log = _compat_restore()
    denied = log.where(denied=True)
    assert [(r.principal, r.op) for r in denied] == [(Principal.GUEST, "READ")]
    assert log.where(privileged=False).count("path_class") == Counter(
        {PathClass.PHYSMAP: 1, PathClass.GUEST_TREE: 1}
    )
    by = log.where(principal=Principal.DEVICE_MODEL).count("op", "path_class")
    assert by == Counter(
        {
            ("READ", PathClass.PHYSMAP): 3,
            ("DIRECTORY", PathClass.PHYSMAP): 1,
            ("WRITE", PathClass.DM_STATE): 1,
        }
    )
    assert log.where(op="WRITE", path_class=PathClass.PHYSMAP, about=7).count("dm_domid") == {
        None: 3
    }
    assert len(log.where(lambda r: r.peer.pid == 42)) == 12


def test_count_refuses_an_unknown_key() -> None:
    with pytest.raises(ValueError, match="cannot count by 'colour'"):
        _compat_restore().count("colour")
    with pytest.raises(ValueError, match="needs a key"):
        _compat_restore().count()


@given(
    st.lists(
        st.tuples(
            st.sampled_from([XL, QEMU, HV]),
            st.booleans(),
            st.sampled_from(
                [
                    f"{PHYSMAP}/size",
                    "/local/domain/0/device-model/7/state",
                    "/local/domain/7/x",
                    "/tool",
                    None,
                ]
            ),
        ),
        max_size=30,
    )
)
def test_counts_partition_the_requests(rows: list[tuple[list[str], bool, str | None]]) -> None:
    log = XenstoreAudit(
        parse_xenstored(xs("READ", path, cmdline=cmd, priv=priv, domid=0 if priv else 7))
        for cmd, priv, path in rows
    )
    assert sum(log.count("principal").values()) == len(rows)
    assert sum(log.count("privileged", "denied").values()) == len(rows)
    # One path per request here, so the path classes partition the requests too.
    assert sum(log.count("path_class").values()) == len(rows)
    physmap = sum(1 for _c, _p, path in rows if path == f"{PHYSMAP}/size")
    assert sum(log.physmap_ops(about=7).values()) == physmap


# --------------------------------------------------------------------- a real xenstored log

CLIENT = """\
import json, sys, trio
from xenstored_sim.client import open_xenstore

async def main() -> None:
    sock, ops = sys.argv[-2], json.loads(sys.argv[-1])
    async with open_xenstore(sock) as xs:
        for op, path, *value in ops:
            if op == "write":
                await xs.write(path, value[0])
            elif op == "read":
                await xs.read(path)
            elif op == "directory":
                await xs.directory(path)
            elif op == "txwrite":
                async with xs.transaction() as t:
                    await t.write(path, value[0])

trio.run(main)
"""


def _run_as(program: Path, args: list[str], sock: Path, ops: list[list[str]]) -> int:
    """Run the client as a process whose command line names ``program``; returns its pid."""
    with subprocess.Popen(
        [sys.executable, str(program), *args, str(sock), json.dumps(ops)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return proc.pid


async def test_a_real_xenstored_log_tells_the_principals_apart(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("xl-sim", "qemu-model"):
        (bin_dir / name).write_text(CLIENT)
    daemon = Daemon(
        "xenstored",
        xenstored_command(str(rundir), audit=True),
        RunDir(rundir).xenstored_socket,
        tmp_path / "xenstored.log",
    )
    RunDir(rundir).audit_dir.mkdir(parents=True)
    sock = RunDir(rundir).xenstored_socket
    root = f"{PHYSMAP}"
    try:
        await start_daemon(daemon)
        async with open_xenstore(sock) as dom0:
            await dom0.mkdir("/local/domain/7")
            await dom0.set_perms("/local/domain/7", ["n7"])
            await dom0.introduce(7, 0, 1)
        # The toolstack plants the keys (one in a transaction), the device model reads them.
        toolstack_ops = [
            ["write", f"{root}/start_addr", "f0000000"],
            ["write", f"{root}/size", "1000000"],
            ["txwrite", f"{root}/name", "vga.vram"],
        ]
        xl_pid = _run_as(bin_dir / "xl-sim", ["--rundir", str(rundir)], sock, toolstack_ops)
        dm_ops = [
            ["directory", "/local/domain/0/device-model/7/physmap"],
            ["read", f"{root}/start_addr"],
            ["write", "/local/domain/0/device-model/7/state", "running"],
        ]
        dm_pid = _run_as(bin_dir / "qemu-model", ["--domid", "7"], sock, dm_ops)
        guest_sock = RunDir(rundir).guest_socket(7)
        async with open_xenstore(guest_sock) as g:
            await g.write("/local/domain/7/data", "hello")
            with pytest.raises(Exception, match="EACCES"):
                await g.read(f"{root}/start_addr")
    finally:
        await stop_daemon(daemon)

    log = read_xenstored(RunDir(rundir).audit_log("xenstored"))
    # The three toolstack writes, the transaction's commit, the device model's directory and
    # read, and the guest's refused read.
    assert log.physmap_ops(about=7) == {"toolstack": 4, "device-model": 2, "guest": 1}
    dm = log.where(principal=Principal.DEVICE_MODEL)
    assert {r.peer.dm_domid for r in dm} == {7}
    assert dm.count("path_class")[PathClass.DM_STATE] == 1
    commit = log.where(principal=Principal.TOOLSTACK, op="TRANSACTION_END")
    (committed,) = commit
    assert f"{root}/name" in committed.paths
    assert committed.path_classes == {PathClass.PHYSMAP}
    refused = log.where(denied=True)
    assert [(r.principal, r.op, r.domid, r.priv) for r in refused] == [
        (Principal.GUEST, "READ", 7, False)
    ]
    assert log.where(principal=Principal.GUEST, path_class=PathClass.GUEST_TREE).count("op") == {
        "WRITE": 1
    }
    # SO_PEERCRED names the very processes that made the requests.
    assert {r.peer.pid for r in log.where(principal=Principal.TOOLSTACK)} == {xl_pid}
    assert {r.peer.pid for r in dm} == {dm_pid}

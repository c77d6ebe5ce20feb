"""Principals are told apart by the socket they use, not by their pid: the launcher gives the
toolstack and the device models sockets of their own on both daemons (docs/architecture.md,
"Principals in the audit logs"), which holds across PID namespaces where ``SO_PEERCRED`` gives
pid 0 and no command line.

The clients here run in the test process, whose command line (pytest) names no principal: only
the socket can have told the audit who they are.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from hypervisor_sim.client import open_hypervisor
from physmap_lab.auditlog import (
    Principal,
    classify_peer,
    parse_hypercall,
    parse_xenstored,
    read_hypervisor,
    read_xenstored,
)
from physmap_lab.stack import PRINCIPALS, Stack, executable, open_stack, principal_socket
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import Op


async def test_each_principal_socket_names_its_principal_in_both_audits(tmp_path: Path) -> None:
    async with open_stack(tmp_path / "run", audit=True) as stack:
        run = str(stack.rundir)
        for principal in (*PRINCIPALS, None):
            xs_path = principal_socket(run, principal, "xenstored") if principal else None
            hv_path = principal_socket(run, principal, "hypervisor") if principal else None
            async with open_xenstore(xs_path or str(stack.xenstored_socket)) as xs:
                await xs.write(f"/test/{principal}", b"x")
            async with open_hypervisor(hv_path or stack.hypervisor_socket) as hv:
                await hv.version()
    # The daemons have stopped: their audit logs are complete.
    xs_log = read_xenstored(stack.rundir / "audit" / "xenstored.jsonl")
    hv_log = read_hypervisor(stack.rundir / "audit" / "hypervisor.jsonl")
    writes = {r.paths[0]: r for r in xs_log if r.op == "WRITE"}
    assert writes["/test/toolstack"].principal is Principal.TOOLSTACK
    assert writes["/test/device-model"].principal is Principal.DEVICE_MODEL
    # The same process on the shared socket: its command line names no principal.
    assert writes["/test/None"].principal is Principal.OTHER
    assert all(r.priv for r in writes.values())
    versions = [h for h in hv_log if h.call == "version"]
    assert [h.principal for h in versions] == [
        Principal.TOOLSTACK,
        Principal.DEVICE_MODEL,
        Principal.OTHER,
    ]


def test_an_assigned_principal_needs_no_pid_or_command_line() -> None:
    # What xenstored records for a peer in another PID namespace: pid 0, no command line.
    base = {"t": 1.0, "conn": 3, "domid": 0, "priv": True, "op": "WRITE", "result": "OK"}
    blind = {**base, "path": "/local/domain/0/device-model/1/physmap", "pid": 0, "cmdline": []}
    assert parse_xenstored(blind).principal is Principal.OTHER
    for name, principal in (
        ("toolstack", Principal.TOOLSTACK),
        ("device-model", Principal.DEVICE_MODEL),
    ):
        rec = parse_xenstored({**blind, "principal": name})
        assert rec.principal is principal
        hc = parse_hypercall(
            {"t": 1.0, "conn": 1, "peer": {"pid": 0, "cmdline": [], "principal": name},
             "call": "version", "domid": None, "result": "ok"}
        )  # fmt: skip
        assert hc.principal is principal


def test_the_socket_outranks_the_command_line_and_the_guest_socket_outranks_both() -> None:
    xl = ["/venv/bin/python", "/venv/bin/xl-sim", "create"]
    assert classify_peer(xl, assigned="device-model") is Principal.DEVICE_MODEL
    assert classify_peer([], assigned="toolstack") is Principal.TOOLSTACK
    assert classify_peer(xl, assigned="intruder") is Principal.OTHER
    assert classify_peer(xl, guest=True, assigned="toolstack") is Principal.GUEST
    assert classify_peer(xl) is Principal.TOOLSTACK


async def test_the_launcher_points_xl_sim_and_its_device_models_at_their_sockets(
    tmp_path: Path,
) -> None:
    """A domain created with ``xl-sim`` on the launcher's environment: every xenstore and
    hypercall connection of the toolstack and of the device model is on its own socket."""
    async with open_stack(tmp_path / "run", audit=True) as stack:
        env = Stack.attach(stack.rundir).env()
        xl = [executable("xl-sim"), "--rundir", str(stack.rundir), "--json"]
        with trio.fail_after(60):
            created = await trio.run_process(
                [*xl, "create", "--name", "p", "--memory", "32"], env=env, capture_stdout=True
            )
            domid = str(json.loads(created.stdout.decode().strip().splitlines()[-1])["domid"])
            # Libxenstore's own client, as the launcher's environment points it.
            proc = await trio.run_process(
                ["xenstore-read", "/local/domain/0/name"], env=env, check=False,
                capture_stdout=True, capture_stderr=True,
            )  # fmt: skip
            await trio.run_process([*xl, "destroy", domid], env=env, capture_stdout=True)
    xs_log = read_xenstored(stack.rundir / "audit" / "xenstored.jsonl")
    hv_log = read_hypervisor(stack.rundir / "audit" / "hypervisor.jsonl")
    assert proc.returncode in (0, 1), proc.stderr
    by_program: dict[str, set[str | None]] = {}
    for peer in [r.peer for r in xs_log] + [h.peer for h in hv_log if h.peer is not None]:
        if peer.program in ("xl-sim", "qemu-model", "xenstore-read"):
            by_program.setdefault(peer.program, set()).add(peer.assigned)
    assert by_program == {
        "xl-sim": {"toolstack"},
        "qemu-model": {"device-model"},
        "xenstore-read": {"toolstack"},
    }


@pytest.mark.parametrize(
    ("program", "spec", "error"),
    [
        ("xenstored-sim", "toolstack", "expected NAME=PATH"),
        ("xenstored-sim", "Tool Stack=/x", "expected NAME=PATH"),
        ("hypervisor-sim", "toolstack=", "expected NAME=PATH"),
        ("hypervisor-sim", "a=/x --principal-socket a=/y", "given twice"),
    ],
)
def test_a_bad_principal_socket_is_one_line_and_status_2(
    tmp_path: Path, program: str, spec: str, error: str
) -> None:
    extra: list[str] = []
    for part in spec.split(" --principal-socket "):
        extra += ["--principal-socket", part]
    proc = subprocess.run(
        [executable(program), "--rundir", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert error in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


async def test_principal_sockets_and_their_connections_survive_a_live_update(
    tmp_path: Path,
) -> None:
    async with open_stack(tmp_path / "run", audit=True) as stack:
        dm_socket = principal_socket(str(stack.rundir), "device-model", "xenstored")
        async with (
            open_xenstore(str(stack.xenstored_socket)) as admin,
            open_xenstore(dm_socket) as before,
        ):
            await before.write("/lu/before", b"1")
            with trio.fail_after(30):
                await admin.request(Op.CONTROL, b"live-update\0-c\0\0")
                await admin.request(Op.CONTROL, b"live-update\0-s\0-F\0")
                await before.write("/lu/kept", b"2")
                async with open_xenstore(dm_socket) as after:
                    await after.write("/lu/after", b"3")
    log = read_xenstored(stack.rundir / "audit" / "xenstored.jsonl")
    writes = {r.paths[0]: r for r in log if r.op == "WRITE"}
    for path in ("/lu/before", "/lu/kept", "/lu/after"):
        assert writes[path].principal is Principal.DEVICE_MODEL, path

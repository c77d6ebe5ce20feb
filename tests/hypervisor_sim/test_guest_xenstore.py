"""The guest's xs_* ops go through its own guest socket of a real xenstored-sim."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import HypercallError
from physmap_lab.stack import terminate
from xenhost import RunDir
from xenstored_sim.client import open_xenstore


async def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(15):
        while not path.exists():
            assert proc.poll() is None, f"xenstored-sim exited with {proc.returncode}"
            await trio.sleep(0.02)


async def test_guest_xenstore_ops(spawn: Callable[..., Any]) -> None:
    hv_daemon = spawn()
    rundir: Path = hv_daemon.rundir
    xenstored = subprocess.Popen(
        [os.fspath(Path(sys.executable).parent / "xenstored-sim"), "--rundir", os.fspath(rundir)]
    )
    try:
        await _wait_for(RunDir(rundir).xenstored_socket, xenstored)
        async with open_hypervisor(hv_daemon.sock) as hv:
            domid = await hv.domain_create("xs-guest", max_pages=1)
            home = f"/local/domain/{domid}"
            async with open_xenstore(RunDir(rundir).xenstored_socket) as xs:
                await xs.mkdir(home)
                await xs.set_perms(home, [f"n{domid}"])
                await xs.introduce(domid, 0, 1)  # C needs an event channel > 0
            await _wait_for(RunDir(rundir).guest_socket(domid), xenstored)
            await hv.domain_unpause(domid)
            results = await hv.guest(
                domid,
                [
                    {"op": "xs_write", "path": f"{home}/data/greeting", "value": "hello"},
                    {"op": "xs_read", "path": f"{home}/data/greeting"},
                    {"op": "xs_directory", "path": f"{home}/data"},
                    {"op": "xs_rm", "path": f"{home}/data/greeting"},
                    {"op": "xs_directory", "path": f"{home}/data"},
                ],
            )
            assert results == [None, b"hello", ["greeting"], None, []]
            with pytest.raises(HypercallError) as exc:
                await hv.guest(domid, [{"op": "xs_read", "path": f"{home}/data/greeting"}])
            assert exc.value.errno_name == "ENOENT"
            assert "ops[0] xs_read" in exc.value.message
            # The guest socket acts as the unprivileged domain: dom0's tree is closed to it.
            with pytest.raises(HypercallError) as exc:
                await hv.guest(
                    domid, [{"op": "xs_write", "path": "/local/domain/0/x", "value": "1"}]
                )
            assert exc.value.errno_name == "EACCES"
    finally:
        terminate(xenstored)


async def test_destroying_a_guest_that_used_xenstore(spawn: Callable[..., Any]) -> None:
    """The guest actor's xenstore connection closes with the domain; the daemon lives on."""
    hv_daemon = spawn()
    rundir: Path = hv_daemon.rundir
    xenstored = subprocess.Popen(
        [os.fspath(Path(sys.executable).parent / "xenstored-sim"), "--rundir", os.fspath(rundir)]
    )
    try:
        await _wait_for(rundir / "socket", xenstored)
        async with open_hypervisor(hv_daemon.sock) as hv:
            for round_ in range(2):
                domid = await hv.domain_create(f"xs-guest-{round_}", max_pages=1)
                home = f"/local/domain/{domid}"
                async with open_xenstore(rundir / "socket") as xs:
                    await xs.write(home, "")
                    await xs.set_perms(home, [f"n{domid}"])
                    await xs.write(f"{home}/name", "g")  # inherits the guest as owner
                    await xs.introduce(domid, 0, 1)
                await _wait_for(rundir / "domains" / f"{domid}.sock", xenstored)
                await hv.domain_unpause(domid)
                assert await hv.guest(domid, [{"op": "xs_read", "path": f"{home}/name"}]) == [b"g"]
                await hv.domain_destroy(domid)
            assert (await hv.version())["has_map2"] in (True, False)
        assert hv_daemon.proc.poll() is None, "hypervisor-sim died destroying the guest"
    finally:
        terminate(xenstored)

"""Fixtures for the fault tests: a real stack, ``xl-sim`` as a separate process, and helpers
that look for anything a failed operation could leave behind."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio

import xenhost
from physmap_lab.stack import Stack, XlSim, communicate
from xenhost import RunDir
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

MEM = "16"
MODE = ("--width", "320", "--height", "200", "--bpp", "32")


def assert_clear_failure(rc: int, out: dict[str, Any], err: str) -> str:
    """A failure the user can read: exit status 1, an error message, no traceback."""
    assert rc == 1, f"exit status {rc}: {err}"
    assert "Traceback" not in err, err
    assert isinstance(out.get("error"), str) and out["error"], out
    return str(out["error"])


async def xs_exists(stack: Stack, path: str) -> bool:
    async with open_xenstore(stack.xenstored_socket) as xs:
        try:
            await xs.read(path)
        except XsError as exc:
            assert exc.errno_name == "ENOENT", exc
            return False
        return True


async def assert_nothing_of(stack: Stack, domid: int, *, hypervisor_alive: bool = True) -> None:
    """No trace of ``domid``: xenstore, device model, files (and, while the hypervisor runs,
    its memory file: a hypervisor killed with SIGKILL cannot remove it)."""
    run = stack.rundir
    assert not xenhost.device_models(run), "a device model is still running"
    for path in (
        f"/local/domain/{domid}",
        f"/local/domain/0/device-model/{domid}",
        f"/libxl/{domid}",
    ):
        assert not await xs_exists(stack, path), f"{path} was left behind"
    assert not RunDir(run).qmp_socket(domid).exists()
    if hypervisor_alive:
        assert not RunDir(run).guest_memory(domid).exists()
    assert not list(run.glob(f"lib/userdata-d.{domid}.*"))
    assert not list(run.glob(f"lib/qemu-*.{domid}"))


def audit_actions(rundir: Path, command: str) -> list[str]:
    path = RunDir(rundir).audit_log("toolstack")
    if not path.exists():
        return []
    actions: list[str] = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("command") == command:
                actions.append(f"{entry.get('action')}:{entry.get('call', '')}")
    return actions


async def wait_for_audit(rundir: Path, command: str, action: str, proc: trio.Process) -> bool:
    """Wait until the toolstack's audit log shows ``action`` (``name`` or ``name:call``) for
    ``command``; False if the process ended first."""
    with trio.fail_after(30):
        while True:
            for seen in audit_actions(rundir, command):
                if seen == action or seen.split(":", 1)[0] == action:
                    return True
            if proc.returncode is not None or proc.poll() is not None:
                return False
            await trio.sleep(0.002)


class Faults(XlSim):
    """The ``xl`` fixture: ``xl-sim`` plus the fault tests' checks, as methods (test modules
    cannot import this conftest under ``--import-mode=importlib``)."""

    clear_failure = staticmethod(assert_clear_failure)
    device_models = staticmethod(xenhost.device_models)
    wait_for_audit = staticmethod(wait_for_audit)
    communicate = staticmethod(communicate)

    async def nothing_of(self, domid: int, *, hypervisor_alive: bool = True) -> None:
        await assert_nothing_of(self.stack, domid, hypervisor_alive=hypervisor_alive)

    async def exists(self, path: str) -> bool:
        return await xs_exists(self.stack, path)

    async def draw(self, domid: int, seed: int) -> str:
        await self("guest", str(domid), "map-bar")
        await self("guest", str(domid), "set-mode", *MODE)
        await self("guest", str(domid), "draw", "--seed", str(seed), *MODE)
        return await self.fb_hash(domid)

    async def fb_hash(self, domid: int) -> str:
        return str((await self("guest", str(domid), "fb-hash", *MODE))["sha256"])


@pytest.fixture
def xl(stack: Stack) -> Faults:
    return Faults(stack)

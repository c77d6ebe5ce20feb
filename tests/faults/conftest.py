"""Fixtures for the fault tests: a real stack, ``xl-sim`` as a separate process, and helpers
that look for anything a failed operation could leave behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import xenhost
from physmap_lab.stack import Stack, open_stack
from xenhost import RunDir
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

XL_SIM = str(Path(sys.executable).parent / "xl-sim")
MEM = "16"
MODE = ("--width", "320", "--height", "200", "--bpp", "32")


class Xl:
    """Runs ``xl-sim --json`` against one stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def argv(self, *args: str) -> list[str]:
        return xenhost.xl_json_argv(self.stack.rundir, *args, program=XL_SIM)

    async def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        proc = await trio.run_process(
            self.argv(*args),
            env=self.stack.env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = proc.stdout.decode().strip()
        return proc.returncode, json.loads(out) if out else {}, proc.stderr.decode()

    async def __call__(self, *args: str) -> dict[str, Any]:
        rc, out, err = await self.run(*args)
        assert rc == 0, f"xl-sim {' '.join(args)} failed ({rc}): {err}"
        return out

    async def draw(self, domid: int, seed: int) -> str:
        await self("guest", str(domid), "map-bar")
        await self("guest", str(domid), "set-mode", *MODE)
        await self("guest", str(domid), "draw", "--seed", str(seed), *MODE)
        return await self.fb_hash(domid)

    async def fb_hash(self, domid: int) -> str:
        return str((await self("guest", str(domid), "fb-hash", *MODE))["sha256"])


def assert_clear_failure(rc: int, out: dict[str, Any], err: str) -> str:
    """A failure the user can read: exit status 1, an error message, no traceback."""
    assert rc == 1, f"exit status {rc}: {err}"
    assert "Traceback" not in err, err
    assert isinstance(out.get("error"), str) and out["error"], out
    return str(out["error"])


def device_models(rundir: Path) -> list[int]:
    """Pids of qemu-model processes serving ``rundir``."""
    return xenhost.device_models(rundir)


def stop_leftover_device_models(rundir: Path) -> None:
    pids = device_models(rundir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and device_models(rundir):
            time.sleep(0.05)


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
    assert not device_models(run), "a device model is still running"
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


@pytest.fixture
def rundir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    stop_leftover_device_models(path)


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir, audit=True) as st:
        yield st


class Faults(Xl):
    """The ``xl`` fixture: ``xl-sim`` plus the fault tests' checks, as methods (test modules
    cannot import this conftest under ``--import-mode=importlib``)."""

    clear_failure = staticmethod(assert_clear_failure)
    device_models = staticmethod(device_models)
    wait_for_audit = staticmethod(wait_for_audit)

    async def nothing_of(self, domid: int, *, hypervisor_alive: bool = True) -> None:
        await assert_nothing_of(self.stack, domid, hypervisor_alive=hypervisor_alive)

    async def exists(self, path: str) -> bool:
        return await xs_exists(self.stack, path)


@pytest.fixture
def xl(stack: Stack) -> Faults:
    return Faults(stack)

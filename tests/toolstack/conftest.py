"""Fixtures for the toolstack's integration tests: a real xenstored-sim and hypervisor-sim, and
``xl-sim`` run as the separate process it is."""

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
from xenhost import xl_json_argv

XL_SIM = str(Path(sys.executable).parent / "xl-sim")


class Xl:
    """Runs ``xl-sim --json`` against one stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.rundir = stack.rundir

    async def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        proc = await trio.run_process(
            xl_json_argv(self.rundir, *args, program=XL_SIM),
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


def _device_models(rundir: Path) -> list[int]:
    """Pids of qemu-model processes serving ``rundir``."""
    return xenhost.device_models(rundir)


def stop_leftover_device_models(rundir: Path) -> list[int]:
    """SIGTERM then SIGKILL any device model a failed test left running; returns their pids."""
    pids = _device_models(rundir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _device_models(rundir):
            time.sleep(0.05)
    return pids


@pytest.fixture
def rundir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    stop_leftover_device_models(path)


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir, audit=True) as st:
        yield st


@pytest.fixture
def xl(stack: Stack) -> Xl:
    return Xl(stack)

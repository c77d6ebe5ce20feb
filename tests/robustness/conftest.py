"""Fixtures for the robustness tests: a real stack on a temporary run directory, and
``xl-sim --json`` run as the separate process it is."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from physmap_lab.soak_walk import kill_device_models
from physmap_lab.stack import Stack, open_stack
from xenhost import xl_json_argv

BIN = Path(sys.executable).parent


class Xl:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    async def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        proc = await trio.run_process(
            xl_json_argv(self.stack.rundir, *args, program=str(BIN / "xl-sim")),
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


@pytest.fixture
def rundir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    kill_device_models(path)


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir) as st:
        yield st


@pytest.fixture
def xl(stack: Stack) -> Xl:
    return Xl(stack)

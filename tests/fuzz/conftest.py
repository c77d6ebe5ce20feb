"""A real stack for the process-level fuzz tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from physmap_lab.fuzz import stop_leftover_device_models
from physmap_lab.stack import Stack, open_stack


@pytest.fixture
def rundir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    stop_leftover_device_models(path)


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir, audit=True) as st:
        yield st

"""Fixtures for the robustness tests: the suite's real stack (``tests/conftest.py``), without
audit logs, and ``xl-sim --json`` run as the separate process it is."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from physmap_lab.stack import Stack, open_stack

BIN = Path(sys.executable).parent


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir) as st:
        yield st

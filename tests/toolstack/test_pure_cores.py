"""The toolstack's pure cores import no trio (docs/architecture.md, "Dependency rule")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "toolstack.config",
    "toolstack.emulator_xenstore",
    "toolstack.image",
    "toolstack.memory_stream",
    "toolstack.savefile",
    "toolstack.stream",
    "toolstack.streamio",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_trio(module: str) -> None:
    code = f"import sys, {module}; sys.exit('trio' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imports trio\n{proc.stderr}"

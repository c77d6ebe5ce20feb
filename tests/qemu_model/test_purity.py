"""The device model's pure core imports no trio (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "qemu_model.mapcache",
    "qemu_model.machine",
    "qemu_model.qmp",
    "qemu_model.vmstate",
    "qemu_model.testing",
    "hypervisor_sim.guest_drivers",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_trio(module: str) -> None:
    code = f"import sys, {module}; sys.exit('trio' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imports trio\n{proc.stderr}"

"""The package rules of docs/architecture.md: pure cores import no trio, and packages meet
only through wire protocols and client libraries."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Modules that import no trio: the sans-IO cores, and the blocking clients and libraries
# (privcmd, xenforeignmemory) that synchronous code such as the mapcache calls.
NO_TRIO_MODULES = [
    "xenhost",
    "xenhost.rundir",
    "xenhost.process",
    "xenhost.devices",
    "xenstored_sim.wire",
    "xenstored_sim.core",
    "xenstored_sim.startup",
    "xenstored_sim.server.conn_io",
    "hypervisor_sim.vma",
    "hypervisor_sim.guest_drivers",
    "qemu_model.mapcache",
    "qemu_model.machine",
    "qemu_model.qmp",
    "qemu_model.vmstate",
    "qemu_model.testing",
    "qemu_model.ui.console",
    "qemu_model.ui.dirty",
    "qemu_model.ui.rfb",
    "hypervisor_sim.protocol",
    "hypervisor_sim.core",
    "hypervisor_sim.privcmd",
    "hypervisor_sim.xenforeignmemory",
    "toolstack.config",
    "toolstack.dmperms",
    "toolstack.emulator_xenstore",
    "toolstack.image",
    "toolstack.memory_stream",
    "toolstack.migration_stream",
    "toolstack.savefile",
    "toolstack.stream",
    "toolstack.streamio",
    "toolstack.xlcfg",
]

# package -> the only modules of other packages it may import
ALLOWED: dict[str, set[str]] = {
    "xenhost": set(),
    "xenstored_sim": {"xenhost"},
    "hypervisor_sim": {
        "xenhost",
        "xenstored_sim.wire",
        "xenstored_sim.client",
        "xenstored_sim.ready",
        "xenstored_sim.startup",
    },
    "qemu_model": {
        "xenhost",
        "xenstored_sim.ready",
        "xenstored_sim.wire",
        "xenstored_sim.client",
        "xenstored_sim.startup",
        "hypervisor_sim.client",
        "hypervisor_sim.privcmd",
        "hypervisor_sim.vma",
        "hypervisor_sim.protocol",
        "hypervisor_sim.xenforeignmemory",
    },
    "physmap_lab": {
        "xenhost",
        "xenstored_sim.wire",
        "xenstored_sim.client",
        "xenstored_sim.startup",
        "hypervisor_sim.client",
        "hypervisor_sim.protocol",
        "hypervisor_sim.guest_drivers",
        "toolstack",
    },
    "toolstack": {
        "xenhost",
        "xenstored_sim.wire",
        "xenstored_sim.client",
        "xenstored_sim.startup",
        "hypervisor_sim.client",
        "hypervisor_sim.protocol",
        "hypervisor_sim.guest_drivers",
    },
}
OURS = {"xenhost", "xenstored_sim", "hypervisor_sim", "qemu_model", "toolstack", "physmap_lab"}


@pytest.mark.parametrize("module", NO_TRIO_MODULES)
def test_module_imports_no_trio(module: str) -> None:
    code = f"import sys, {module}; sys.exit('trio' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imports trio\n{proc.stderr}"


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` names the module pkg.mod
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_meet_only_through_contracts(package: str) -> None:
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top not in OURS or top == package:
                continue
            if not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)

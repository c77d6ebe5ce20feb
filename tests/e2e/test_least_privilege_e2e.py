"""End to end: ``physmap-lab audit`` derives the device model's permission set, then re-runs
the cells with the device model in a stub domain holding exactly that set (docs/qemu-physmap.md,
'Stub domains'), on real processes.

One small run (libxl, compat and new, stdvga, privileged) is shared by every test here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: The device model's readiness node, named relative to its own home (docs/qemu-physmap.md,
#: 'Start-up and readiness').
STATE = "w ~/device-model/$DOMID/state"


@dataclass
class Enforced:
    derived: dict[str, list[str]]
    granted: dict[str, list[str]]
    cells: list[dict[str, Any]]
    conclusions: dict[str, bool | None]
    report: str
    stderr: str
    returncode: int

    def cell(self, mode: str, variant: str) -> dict[str, Any]:
        found = [c for c in self.cells if c["mode"] == mode and c["variant"] == variant]
        assert len(found) == 1, (mode, variant, self.cells)
        return found[0]


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Enforced:
    out = tmp_path_factory.mktemp("least-privilege")
    argv = [sys.executable, "-m", "physmap_lab", "audit", "--json", "--out", str(out)]
    argv += ["--toolstack", "libxl", "--mode", "compat", "--mode", "new"]
    argv += ["--device", "stdvga", "--dm", "privileged"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    doc = json.loads(proc.stdout)["least_privilege_enforced"]
    report = (Path(out) / "report.md").read_text()
    return Enforced(
        doc["derived"],
        doc["granted"],
        doc["cells"],
        doc["conclusions"],
        report,
        proc.stderr,
        proc.returncode,
    )


def test_every_enforced_cell_ends_as_the_facts_predict(enforced: Enforced) -> None:
    assert enforced.returncode == 0, enforced.stderr
    assert {(c["mode"], c["variant"]) for c in enforced.cells} == {
        ("new", "stubdom"),
        ("compat", "stubdom"),
        ("compat", "stubdom-no-physmap-grant"),
        ("compat", "restore-in-stubdom"),
        ("compat", "restore-in-stubdom-no-physmap-grant"),
    }
    for c in enforced.cells:
        assert c["outcome"] == c["expected"], c
    assert all(enforced.conclusions.values()), enforced.conclusions


def test_new_mode_passes_in_a_stub_with_nothing_for_the_physmap(enforced: Enforced) -> None:
    assert enforced.derived["new"] == [STATE]
    # Its state node is in the stub's own, stub-owned tree (docs/qemu-physmap.md, 'Stub domains'):
    # nothing under dom0's tree.
    assert enforced.granted["new"] == []
    assert enforced.conclusions["new_set_has_nothing_under_dom0s_tree"] is True
    c = enforced.cell("new", "stubdom")
    assert c["grants"] == []
    assert c["outcome"] == "intact" and c["fb_hash_matches"]
    assert c["denied_ops"] == 0 and c["dm_physmap_ok"] == 0
    # Every request of the device model came from a stub domain's socket, none privileged.
    assert c["dm_requests"] > 0 and c["dm_privileged_requests"] == 0
    assert 0 not in c["dm_domids"] and not set(c["dm_domids"]) & set(c["domids"])


def test_compat_needs_to_write_under_the_dom0_owned_physmap_path(enforced: Enforced) -> None:
    physmap = [g for g in enforced.derived["compat"] if "/physmap" in g]
    assert STATE in enforced.derived["compat"]
    assert sorted(enforced.granted["compat"]) == sorted(physmap)
    assert any(g.startswith("w /local/domain/0/device-model/$DOMID/physmap/") for g in physmap)
    granted = enforced.cell("compat", "restore-in-stubdom")
    assert granted["outcome"] == "intact" and granted["denied_ops"] == 0
    assert len(granted["keys_carried"]) == 3 and granted["dm_physmap_ok"] > 0
    for variant in ("restore-in-stubdom-no-physmap-grant", "stubdom-no-physmap-grant"):
        c = enforced.cell("compat", variant)
        assert sorted(c["withheld"]) == sorted(physmap)
        assert c["outcome"] == "aborted" and c["dm_physmap_ok"] == 0
        assert c["denied_ops"] > 0
        assert all(k.endswith("-> EACCES") and "/physmap" in k for k in c["denied"])
    # Writes are refused when the guest maps the BAR, the listing when the restore reads back.
    ops = {k.split()[0] for k in enforced.cell("compat", "stubdom-no-physmap-grant")["denied"]}
    assert ops == {"DIRECTORY", "WRITE"}


def test_compat_in_a_stub_from_creation_loses_its_keys_at_save(enforced: Enforced) -> None:
    # libxl saves from the stub's own device-model directory (docs/qemu-physmap.md, 'libxl: save'),
    # where the compat device model, writing under /local/domain/0, left nothing.
    c = enforced.cell("compat", "stubdom")
    assert c["denied_ops"] == 0 and c["dm_physmap_ok"] > 0
    assert c["keys_carried"] == {} and c["outcome"] == "aborted"


def test_the_report_has_the_enforced_section(enforced: Enforced) -> None:
    assert "## Least privilege, enforced: the device model in a stub domain" in enforced.report
    c = enforced.cell("compat", "restore-in-stubdom")
    row = f"| compat | stdvga | restore-in-stubdom | {len(c['grants'])} | intact | 3 |"
    assert row in enforced.report

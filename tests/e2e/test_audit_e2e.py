"""End to end: ``physmap-lab audit --json --out DIR`` runs the whole matrix (toolstack x mode x
device x device model, the restricted cells as QEMU 2.10 and, for stdvga, 3.0: 42 cells) on real
processes, and its findings hold.

One run is shared by every test of this module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

PRINCIPALS = ("toolstack", "device-model", "guest")


@dataclass
class Audit:
    scenarios: list[dict[str, Any]]
    out: Path
    stderr: str
    returncode: int

    def cells(self, **match: str) -> list[dict[str, Any]]:
        found = [s for s in self.scenarios if all(s[k] == v for k, v in match.items())]
        assert found, f"no cell matches {match}"
        return found


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Audit:
    out = tmp_path_factory.mktemp("audit")
    proc = subprocess.run(
        [sys.executable, "-m", "physmap_lab", "audit", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    doc = json.loads(proc.stdout)
    return Audit(doc["scenarios"], out, proc.stderr, proc.returncode)


def test_the_whole_matrix_runs_and_matches_the_facts(audit: Audit) -> None:
    assert len(audit.scenarios) == 42
    cells = {(s["toolstack"], s["mode"], s["device"], s["dm"], s["qemu"]) for s in audit.scenarios}
    assert len(cells) == 42
    for s in audit.scenarios:
        assert s["outcome"] == s["expected"], (s["mode"], s["device"], s["toolstack"], s["dm"])
        assert set(s["principals"]) == set(PRINCIPALS)
        for stats in s["principals"].values():
            assert {"xenstore_ops", "privileged_ops", "denied_ops", "physmap_ops"} <= set(stats)
    assert audit.returncode == 0, audit.stderr


def test_new_mode_keeps_the_physmap_out_of_xenstore(audit: Audit) -> None:
    for s in audit.cells(mode="new"):
        assert s["outcome"] == "intact" and s["fb_hash_matches"] and s["pointers_valid"]
        assert s["keys_carried"] == {}
        for who in PRINCIPALS:
            assert s["principals"][who]["physmap_ops_ok"] == 0
        assert s["principals"]["device-model"]["physmap_ops"] == 0
        tool = s["principals"]["toolstack"]
        # libxl still lists the physmap directory on save and finds nothing (ENOENT).
        if s["toolstack"] == "libxl":
            assert tool["physmap_ops"] == 1
            assert tool["physmap_requests"][0].startswith("save: DIRECTORY")
            assert tool["physmap_requests"][0].endswith("-> ENOENT")
        else:
            assert tool["physmap_ops"] == 0
        for who in PRINCIPALS:
            assert not [p for p in s["least_privilege"][who] if p["physmap"]]


def test_compat_mode_couples_the_toolstack_and_the_device_model(audit: Audit) -> None:
    for s in audit.cells(mode="compat", toolstack="libxl", dm="privileged"):
        assert s["outcome"] == "intact"
        assert s["principals"]["device-model"]["physmap_ops_ok"] > 0
        assert s["principals"]["toolstack"]["physmap_ops_ok"] > 0
        assert sorted(k.rsplit("/", 1)[1] for k in s["keys_carried"]) == [
            "name",
            "size",
            "start_addr",
        ]
        dm = s["least_privilege"]["device-model"]
        assert [p for p in dm if p["physmap"] and p["dom0_owned"] and p["perm"].startswith("w ")]
    for s in audit.cells(mode="compat", toolstack="unaware", dm="privileged"):
        assert s["outcome"] == "aborted" and s["keys_carried"] == {}
        assert not s["fb_hash_matches"]
    # xentoolcore_restrict_all (QEMU 3.0): a compat build refuses to start.
    for s in audit.cells(mode="compat", dm="restricted", qemu="3.0"):
        assert s["outcome"] == "refused"
    # QEMU 2.10 xen_restrict takes the stubs' ENOTTY for success: the compat device model runs
    # with xenstore open and behaves as a privileged one.
    for s in audit.cells(mode="compat", dm="restricted", qemu="2.10"):
        assert s["outcome"] == ("intact" if s["toolstack"] == "libxl" else "aborted")
        assert s["principals"]["device-model"]["physmap_ops_ok"] > 0


def test_pointer_fixup_breaks_only_qxl(audit: Audit) -> None:
    for s in audit.cells(mode="pointer-fixup"):
        if s["device"] == "qxl":
            assert s["outcome"] == "corrupt" and s["pointers_valid"] is False
        else:
            assert s["outcome"] == "intact" and s["fb_hash_matches"] and s["pointers_valid"]


def test_a_restricted_device_model_needs_no_xenstore_in_new_mode(audit: Audit) -> None:
    for s in audit.cells(mode="new", dm="restricted", qemu="3.0"):
        assert s["outcome"] == "intact"
        assert s["principals"]["device-model"]["xenstore_ops"] == 0
        assert s["least_privilege"]["device-model"] == []
    # QEMU 2.10 keeps xenstore open when restricted: only its state node, no physmap request.
    for s in audit.cells(mode="new", dm="restricted", qemu="2.10"):
        assert s["outcome"] == "intact"
        assert s["principals"]["device-model"]["physmap_ops"] == 0
        assert [p["perm"] for p in s["least_privilege"]["device-model"]] == [
            "w ~/device-model/$DOMID/state"
        ]


def test_compat_costs_more_round_trips_on_restore(audit: Audit) -> None:
    for device in ("stdvga", "cirrus", "qxl"):
        (compat,) = audit.cells(mode="compat", device=device, toolstack="libxl", dm="privileged")
        (new,) = audit.cells(mode="new", device=device, toolstack="libxl", dm="privileged")
        assert compat["round_trips"]["restore"] > new["round_trips"]["restore"]
        assert compat["save_s"] > 0 and new["restore_s"] > 0


def test_the_report_and_its_pictures(audit: Audit) -> None:
    report = (audit.out / "report.md").read_text()
    for name in ("matrix", "ops", "physmap-ops", "restore-compat", "restore-new"):
        svg = audit.out / f"{name}.svg"
        root = ET.fromstring(svg.read_text())
        assert root.tag.endswith("svg")
        assert f"({name}.svg)" in report
    # The sequence diagrams are drawn from the recorded events: compat's restore shows the
    # device model reading the physmap, new mode's does not.
    xenstore_physmap = re.compile(r">[A-Z_]+ physmap")
    assert xenstore_physmap.search((audit.out / "restore-compat.svg").read_text())
    assert not xenstore_physmap.search((audit.out / "restore-new.svg").read_text())


def test_the_report_shows_the_intact_and_the_corrupt_qxl_screen(audit: Audit) -> None:
    report = (audit.out / "report.md").read_text()
    intact = audit.out / "screens" / "demo-new-qxl-libxl-after-restore.png"
    corrupt = audit.out / "screens" / "demo-pointer-fixup-qxl-libxl-after-restore.png"
    row = next(line for line in report.splitlines() if "screens/demo-new-qxl" in line)
    assert row.index(intact.name) < row.index(corrupt.name)  # side by side, intact first
    assert sorted(p.name for p in (audit.out / "screens").iterdir()) == sorted(
        [intact.name, corrupt.name]
    )
    with Image.open(intact) as a, Image.open(corrupt) as b:
        assert a.size == b.size == (800, 600)
        assert len(set(a.tobytes())) > 200  # the guest's pattern uses every byte value
        assert a.tobytes() != b.tobytes()  # pointer-fixup shows something else

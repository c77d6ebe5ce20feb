"""End to end: ``physmap-lab audit --migrate`` for compat mode on one device, on two real hosts.

Compat mode is where the keys travel: the source's device model writes them, the source's
toolstack reads them into the stream, the destination's plants them before its device model
starts.  Without a toolstack that carries them the migration fails on the destination as the
save/restore cell does.  The whole migration matrix runs in ``make audit-migrate``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_keys_travel_in_compat_mode_and_fail_without_them_as_restore_does(
    tmp_path: Path,
) -> None:
    argv = ["audit", "--migrate", "--mode", "compat", "--device", "stdvga", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "physmap_lab", *argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    cells = {c["toolstack"]: c for c in doc["migration"]}
    assert set(cells) == {"libxl", "unaware"}
    for c in cells.values():
        assert (c["mode"], c["device"], c["outcome"]) == ("compat", "stdvga", c["expected"])
        assert c["hosts"] == {"source": "src", "destination": "dst"}

    carried = cells["libxl"]
    assert carried["migrated"] and carried["fb_hash_matches"]
    assert carried["keys_carried"] and carried["keys_planted"] == carried["keys_carried"]
    assert carried["planted_before_dm"] is True
    seen = [
        (r["host"], r["principal"], r["phase"], r["op"])
        for r in carried["physmap_requests"]
        if r["result"] == "OK"
    ]
    n = len(carried["keys_carried"])
    assert seen == (
        [("source", "device-model", "map", "WRITE")] * n
        + [("source", "toolstack", "stop-copy", "DIRECTORY")]
        + [("source", "toolstack", "stop-copy", "READ")] * n
        + [("destination", "toolstack", "restore", "WRITE")] * n
        + [("destination", "device-model", "restore", "DIRECTORY")]
        + [("destination", "device-model", "restore", "READ")] * n
    )
    assert not [a for a in carried["access"] if a["phase"] == "verify"]

    lost = cells["unaware"]
    assert not lost["migrated"] and lost["keys_carried"] == {}
    assert "the domain runs on here" in lost["error"]
    assert "Assertion" in lost["failure"]
    assert lost["physmap_ops"]["destination"]["toolstack"] == 0
    match = lost["restore_match"]
    assert match["matches"] and match["failure"] == match["restore_failure"]
    assert match["dm_requests"] == match["restore_dm_requests"] != []
    [twin] = doc["restore_twins"]
    assert (twin["mode"], twin["toolstack"], twin["outcome"]) == ("compat", "unaware", "aborted")

    report = (tmp_path / "migration.md").read_text()
    assert "| source (src) | device-model | map |" in report
    assert "| destination (dst) | toolstack | restore |" in report
    assert "1 of 1 failing migration cell(s) fail as their save/restore cell does" in report

"""Differential test: the oracle's probe against a fresh xenstored-sim, diffed with the golden
transcript of C xenstored 4.17.7.  Skips when ../shared/oracle is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ORACLE = Path(__file__).resolve().parents[3].parent / "shared" / "oracle"
GOLDEN = ORACLE / "golden" / "xsprobe-cxenstored-4.17.7.txt"


@pytest.mark.oracle
def test_probe_transcript_equals_c_xenstored(start_daemon) -> None:
    if not GOLDEN.exists():
        pytest.skip("../shared/oracle is absent")
    daemon = start_daemon()
    probe = subprocess.run(
        [sys.executable, str(ORACLE / "xsprobe.py"), "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    mine = probe.stdout.splitlines()
    golden = GOLDEN.read_text().splitlines()
    # The diff must be empty, line for line.
    assert mine == golden

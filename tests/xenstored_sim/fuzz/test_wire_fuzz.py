"""A short run of the wire fuzzer (``physmap_lab.fuzz``) against a real xenstored-sim: random
and mutated frames over many privileged and guest connections at once; afterwards the daemon
runs, logged no traceback, passes its own check and keeps its node accounting consistent with
its tree.  ``make fuzz`` runs the same fuzzer for a million frames."""

from __future__ import annotations

import os
from typing import Any

import pytest

from physmap_lab.fuzz import FrameMaker, fuzz_daemon
from xenstored_sim.wire import HEADER_SIZE, PAYLOAD_MAX

FRAMES = 20_000


async def test_wire_fuzz_short(xenstored: Any) -> None:
    daemon = xenstored
    seed = int.from_bytes(os.urandom(2), "little")
    report = await fuzz_daemon(daemon.rundir, FRAMES, seed)
    assert report.ok, f"seed {seed}: {report.summary()}"
    assert report.frames == FRAMES
    assert report.good_requests > 0
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.read_log(), f"seed {seed}"


@pytest.mark.parametrize("seed", range(5))
def test_frames_are_well_formed_or_deliberately_not(seed: int) -> None:
    rng = FrameMaker(seed)
    fatal = 0
    for i in range(5000):
        data, ends = rng.frame(i)
        if ends:
            fatal += 1
            continue
        assert len(data) >= HEADER_SIZE
        length = int.from_bytes(data[12:16], "little")
        assert length == len(data) - HEADER_SIZE <= PAYLOAD_MAX
    assert 0 < fatal < 100

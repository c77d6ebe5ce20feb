"""The whole-stack random walk (physmap_lab.soak), bounded: a few seeds of a few dozen steps.
``make soak`` runs long ones; a failure names the seed and the step to replay."""

from __future__ import annotations

import os

import pytest

from physmap_lab.soak import run_walk

SEEDS = [int(s) for s in os.environ.get("PHYSMAP_LAB_WALK_SEEDS", "1 2").split()]
STEPS = int(os.environ.get("PHYSMAP_LAB_WALK_STEPS", "40"))


@pytest.mark.e2e
@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_over_the_whole_stack(seed: int) -> None:
    walk = run_walk(seed, STEPS)
    assert len(walk.history) == STEPS

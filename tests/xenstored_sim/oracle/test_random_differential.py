"""A short random differential run (``diffrun.py``): 200 seeded scenarios on C xenstored 4.17
and on xenstored-sim must give identical transcripts.  ``make diff-c`` runs the long version.

The run is skipped when ``../shared/oracle`` is absent; the generator's own test is not.  ``XSDIFF_SEED`` picks another seed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import diffdaemons
import diffgen
import diffrun

SEED = int(os.environ.get("XSDIFF_SEED", "1"))


@pytest.mark.oracle
@pytest.mark.skipif(
    not diffdaemons.oracle_present(), reason=f"no C xenstored oracle at {diffdaemons.ORACLE}"
)
def test_c_and_sim_agree_on_random_scenarios() -> None:
    tally = diffrun.run_seed(SEED, 200, jobs=3)
    assert tally.total == 200
    assert tally.same + tally.c_died == 200, "\n\n".join(tally.reports[:5])
    assert tally.c_died < 50, "C died too often to say much"  # about 8 % is usual


def test_generator_is_deterministic_and_covers_every_type() -> None:
    a = [diffgen.scenario(7, i) for i in range(60)]
    b = [diffgen.scenario(7, i) for i in range(60)]
    assert [s.steps for s in a] == [s.steps for s in b]
    ops = {step.op for s in a for step in s.steps}
    assert set(diffgen.OP_NAMES) - {diffgen.WATCH_EVENT, diffgen.ERROR} <= ops
    assert any(step.oversize for s in a for step in s.steps)
    assert any(s.guests for s in a)

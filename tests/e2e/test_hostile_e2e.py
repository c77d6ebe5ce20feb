"""A compromised device model, end to end: real daemons, real guests, the real attacker.

Two configurations bound the share of ``make test``: compat mode with its device model in
dom0 and new mode in a stub domain with no grant (``make audit-hostile`` runs all six).  Every
cell must be as :mod:`physmap_lab.audit.hostile.predict` says from the principal's
permissions, and every success must show on the victim's side.
"""

from __future__ import annotations

from pathlib import Path

import trio

from physmap_lab.audit.hostile.configs import BY_NAME
from physmap_lab.audit.hostile.predict import visible
from physmap_lab.audit.hostile.runner import run_hostile


async def test_compat_dom0_reaches_everything_new_stub_nothing(tmp_path: Path) -> None:
    configs = [BY_NAME["compat-dom0"], BY_NAME["new-stub"]]
    with trio.fail_after(400):
        runs = await run_hostile(configs, shots=tmp_path / "screens")
    assert [r.error for r in runs] == [None, None]
    for run in runs:
        assert len(run.cells) == 11
        for c in run.cells:
            p = c.predicted
            assert (c.result == "succeeded") == p.succeeded, c.as_json()
            assert p.succeeded or c.errno == p.errno, c.as_json()
            want = visible(run.config.mode, run.config.stubdom, c.attack, p.succeeded)
            assert c.effect == want, c.as_json()
            assert c.victim, f"{c.label}: not read back from the victim's side"
    compat, stub = runs
    # The planted keys are what V1's restored device model displays: V1's secret RAM page.
    plant = next(c for c in compat.cells if c.attack == "physmap-plant")
    assert "shows its secret RAM page" in plant.victim
    assert Path(compat.screens["compat-dom0"]).stat().st_size > 0
    # The stub's credentials: its own guest socket, its hypervisor handle bound to its target.
    assert stub.principal is not None and stub.principal.xenstore == "domain"
    assert stub.principal.hypervisor_to == stub.domids["A"]
    assert all(c.result == "refused" for c in stub.cells)

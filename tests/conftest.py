"""Settings shared by every ring of the suite."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Speed belongs to the benchmarks: no property test fails for being slow on a loaded machine.
settings.register_profile(
    "physmap-lab", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("physmap-lab")

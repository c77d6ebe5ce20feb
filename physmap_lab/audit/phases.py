"""Cut a case's audit records into the phases of the experiment by the demo's step times."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Final

#: The demo's steps (physmap_lab.demo) by the phase of the experiment they belong to.
PHASE_OF_STEP: Final = {
    "create": "boot",
    "info-created": "boot",
    "map-bar": "map",
    "set-mode": "map",
    "draw": "map",
    "fb-hash": "map",
    "info-saved": "map",
    "save": "save",
    "restore": "restore",
    "info-restored": "restore",
    "fb-hash-restored": "restore",
    "destroy": "destroy",
}
PHASES: Final = ("boot", "map", "save", "restore", "destroy")


class PhaseClock:
    """Which phase a wall-clock time falls in: the phase of the last step started by then.

    A request a process makes just after its step returned (a device model answering a guest's
    BAR write) still counts in that step's phase, until the next step starts.
    """

    def __init__(self, spans: Mapping[str, tuple[float, float]]) -> None:
        starts = sorted((w0, PHASE_OF_STEP.get(step, step)) for step, (w0, _w1) in spans.items())
        self._times = [t for t, _ in starts]
        self._phases = [p for _, p in starts]

    def phase_at(self, t: float) -> str | None:
        i = bisect.bisect_right(self._times, t)
        return None if i == 0 else self._phases[i - 1]

"""What one configuration of the hostile audit yields: a cell per attack, compared with the
prediction (:mod:`.predict`), and the run that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .configs import HostileConfig
from .predict import Prediction, Principal


@dataclass(slots=True)
class AttackCell:
    config: str
    attack: str
    label: str
    result: str
    errno: str | None
    predicted: Prediction
    detail: dict[str, Any]
    #: What the victim's side shows, and whether it shows the attack's effect.
    victim: str = ""
    effect: bool = False
    #: Whether the victim's side should show it (:func:`.predict.visible`).
    expected_effect: bool = False

    @property
    def as_predicted(self) -> bool:
        """The request's outcome and its visibility to the victim, as predicted."""
        p = self.predicted
        same = (self.result == "succeeded") == p.succeeded
        return (
            same and (p.succeeded or self.errno == p.errno) and self.effect == self.expected_effect
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "attack": self.attack,
            "label": self.label,
            "result": self.result,
            "errno": self.errno,
            "predicted": self.predicted.as_json(),
            "as_predicted": self.as_predicted,
            "detail": self.detail,
            "victim": self.victim,
            "effect": self.effect,
            "expected_effect": self.expected_effect,
        }


@dataclass(slots=True)
class ConfigRun:
    config: HostileConfig
    principal: Principal | None = None
    domids: dict[str, int] = field(default_factory=dict)
    cells: list[AttackCell] = field(default_factory=list)
    screens: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

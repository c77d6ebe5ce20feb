"""What the domain operations return (cf. libxl_types.idl: libxl_dominfo) and the
bookkeeping a create, save or restore keeps while it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class DomainSummary:
    domid: int
    name: str
    paused: bool
    tot_pages: int
    max_pages: int
    memory_mib: int | None
    vga: str | None
    dm_mode: str | None
    dm_restrict: bool | None
    toolstack: str | None
    dm_pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class CreateResult:
    domid: int
    name: str
    uuid: str
    dm_pid: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class SaveResult:
    domid: int
    file: str
    records: list[str]
    bytes: int
    pages: int
    xenstore_keys: dict[str, str]
    checkpoint: bool
    seconds: float
    #: Seconds spent in each step, in order (:class:`Clock`).
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class RestoreResult:
    domid: int
    name: str
    records: list[str]
    bytes: int
    pages: int
    xenstore_keys: dict[str, str]
    xenstore_keys_ignored: bool
    dm_pid: int
    seconds: float
    #: Seconds spent in each step, in order (:class:`Clock`).
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class Made:
    """What a create or restore has made so far, for the rollback."""

    domid: int | None = None
    uuid: str | None = None
    tree: bool = False
    introduced: bool = False
    dm_pid: int | None = None
    files: list[Path] = field(default_factory=list)


class Clock:
    """Wall time per named step of a save or restore, reported as its ``phases``."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, step: str) -> None:
        """Charge the time since the previous mark to ``step``."""
        now = time.monotonic()
        self.phases[step] = self.phases.get(step, 0.0) + now - self._last
        self._last = now

"""Settings shared by every ring of the suite."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, settings

import xenhost
from physmap_lab.stack import Stack, XlSim, open_stack

_TESTS: Final = Path(__file__).resolve().parent

# Speed belongs to the benchmarks: no property test fails for being slow on a loaded machine.
settings.register_profile(
    "physmap-lab", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("physmap-lab")


# The three rings, as markers.  ``e2e``: whole-stack runs (``tests/e2e``, ``tests/faults``).
# ``integration``: our daemons or Xen's tools as real processes on real sockets: an async test or
# fixture (trio drives every socket), a fixture that starts a process, or a module or directory
# whose tests start processes synchronously.  ``unit``: the rest, pure and fast (``make unit``).
# A test marked explicitly keeps its mark.
_RINGS: Final = ("unit", "integration", "e2e")
_E2E_DIRS: Final = ("e2e/", "faults/")
_PROCESS_PATHS: Final = (
    "plugin/",
    "robustness/",
    "bench/",
    "xenstored_sim/daemon/",
    "xenstored_sim/realclients/",
    "xenstored_sim/oracle/",
    "xenstored_sim/liveupdate/",
    "xenstored_sim/perf/",
    "xenstored_sim/durability/test_restart.py",
    "xenstored_sim/security/",
    "hypervisor_sim/test_daemon.py",
    "physmap_lab/test_compose.py",
    "physmap_lab/test_principal_sockets.py",
)
_PROCESS_FIXTURES: Final = frozenset(
    {
        "c_xenstored",
        "hypervisor",
        "live_daemon",
        "spawn",
        "start_daemon",
        "xen_root",
        "xenstore_control",
        "xenstored",
        "xsd",
    }
)


def _is_async(fixturedef: Any) -> bool:
    func = getattr(fixturedef, "func", None)
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


def _ring(item: pytest.Item) -> str:
    path = Path(str(item.path)).resolve().relative_to(_TESTS).as_posix()
    if path.startswith(_E2E_DIRS):
        return "e2e"
    if path.startswith(_PROCESS_PATHS) or _PROCESS_FIXTURES.intersection(item.fixturenames):
        return "integration"
    if inspect.iscoroutinefunction(getattr(item, "obj", None)):
        return "integration"
    info = getattr(item, "_fixtureinfo", None)
    if info is not None and any(
        _is_async(d) for defs in info.name2fixturedefs.values() for d in defs
    ):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(ring) for ring in _RINGS):
            item.add_marker(_ring(item))


# A real stack on a temporary run directory, for the rings that drive the whole host
# (a directory's own conftest may override ``stack`` with other daemon flags).
@pytest.fixture
def rundir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    xenhost.stop_device_models(path)


@pytest.fixture
async def stack(rundir: Path) -> AsyncIterator[Stack]:
    async with open_stack(rundir, audit=True) as st:
        yield st


@pytest.fixture
def xl(stack: Stack) -> XlSim:
    return XlSim(stack)

"""The toolstack flavour registry: one object per flavour, agreeing with the configuration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import toolstack.flavours as flavours_mod
from toolstack.config import FLAVOURS, DomainConfig, parse_config
from toolstack.flavours import LIBXL, REGISTRY, UNAWARE, flavour


def test_registry_lists_exactly_the_configurable_flavours() -> None:
    assert tuple(REGISTRY) == FLAVOURS


@pytest.mark.parametrize("name", FLAVOURS)
def test_every_configurable_flavour_resolves(name: str) -> None:
    config = parse_config(f"memory = 8\ntoolstack = '{name}'\n")
    assert flavour(config.toolstack).name == name


def test_libxl_carries_emulator_xenstore_data_and_unaware_does_not() -> None:
    assert flavour("libxl") is LIBXL
    assert LIBXL.saves_emulator_xenstore_data and LIBXL.restores_emulator_xenstore_data
    assert flavour("unaware") is UNAWARE
    assert not UNAWARE.saves_emulator_xenstore_data
    assert not UNAWARE.restores_emulator_xenstore_data
    assert flavour(DomainConfig().toolstack) is LIBXL


@pytest.mark.parametrize("bad", ["", "xl", "LIBXL", "libxl "])
def test_unknown_flavour_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"toolstack must be one of libxl, unaware, not "):
        flavour(bad)


def test_registry_is_sans_io() -> None:
    tree = ast.parse(Path(flavours_mod.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "trio" not in imported

"""The compiled core (xenstored_sim/compiled.py): used when it matches the sources, never
when stale or disabled, and the pure core still passes the unit ring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenstored_sim import compiled
from xenstored_sim.core import engine

ROOT = Path(__file__).resolve().parents[3]


def test_make_setup_built_the_core_and_it_is_in_use() -> None:
    # `make setup` compiles the core; `make test` must run against that build.
    if compiled.disabled():
        assert compiled.build_kind() == "pure"
        assert str(engine.__file__).endswith(".py")
        return
    assert compiled.build_kind() == "compiled", "no current build: `make compiled` says why"
    build = compiled.build_dir()
    assert Path(str(engine.__file__)).is_relative_to(build)
    manifest = json.loads((build / "manifest.json").read_text())
    assert set(manifest["modules"]) == {compiled.module_name(p) for p in compiled.sources()}


def test_the_compiled_modules_are_the_core_without_its_inits() -> None:
    names = {compiled.module_name(p) for p in compiled.sources()}
    assert {"xenstored_sim.core.engine", "xenstored_sim.wire.framing"} <= names
    assert not any(n.endswith("__init__") for n in names)
    assert "xenstored_sim.core.journal" not in names


def test_a_changed_source_changes_the_build_key() -> None:
    files = compiled.sources()
    key = compiled.build_key(files)
    assert compiled.build_key(files) == key
    assert compiled.build_key(files[:-1]) != key
    # The key covers contents, not only names: the same list with another file swapped in.
    swapped = [*files[:-1], compiled.PACKAGE_DIR / "cli.py"]
    assert compiled.build_key(swapped) != key


def test_a_build_for_other_sources_is_never_loaded(tmp_path: Path) -> None:
    stale = tmp_path / "0123456789abcdef0123"
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps({"modules": {"x.y": "x/y.so"}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(compiled.PURE_ENV, None)
    code = (
        "import xenstored_sim.compiled as c, pathlib, sys;"
        f"c.CACHE_DIR = pathlib.Path({str(tmp_path)!r});"
        "c._finder = None;"
        "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_CompiledFinder'];"
        "c.install();"
        "print(c._finder is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(compiled.disabled(), reason="this run is already the pure core")
def test_the_pure_core_passes_the_unit_ring() -> None:
    env = dict(os.environ, **{compiled.PURE_ENV: "1"})
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from xenstored_sim.compiled import build_kind; print(build_kind())",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "pure"
    ring = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/xenstored_sim/unit",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ring.returncode == 0, ring.stdout[-3000:] + ring.stderr[-2000:]

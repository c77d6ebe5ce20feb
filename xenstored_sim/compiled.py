"""The compiled build of the sans-IO core: which modules, where, and when it is used.

Theory of operation.  ``make setup`` runs ``python -m xenstored_sim.compiled build``, which
compiles the modules named by :data:`COMPILED` with mypyc into
``<repo>/.cache/mypyc/<key>/``, where ``key`` is a hash of those modules' sources, the
interpreter and this file.  Nothing is ever written next to the ``.py`` files, so an editable
checkout cannot run stale extension modules: when any compiled source changes, the key
changes, the old build no longer matches and the pure modules are imported until the next
``make setup``.  :func:`install` (called by the package's ``__init__``) puts an import hook
first on ``sys.meta_path`` that loads the compiled modules of the matching build, if there
is one.  ``XENSTORED_SIM_PURE=1`` in the environment forces the pure-Python modules.

The compiled modules import no trio (the sans-IO core, and the socket work every request
takes, ``server/conn_io.py``) and avoid what mypyc cannot
compile (monkeypatching, undeclared attributes, subclassing builtins in native classes).  One
trap: after ``self.x = None`` mypy narrows ``self.x`` to None for the rest of the function,
even across calls that set it, and the compiled code then checks for None; read such an
attribute before resetting it.  ``make test`` runs the suite on the compiled build, so such
differences show up there.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

#: Modules to compile, as globs relative to the package directory; ``__init__.py`` files
#: and the names in :data:`NOT_COMPILED` stay pure.  A module added under these
#: directories is compiled too.
COMPILED: Final = ("wire/*.py", "core/*.py", "server/conn_io.py")
#: Modules under :data:`COMPILED` that stay pure: the durable-state codecs, which are not on
#: the request path.
NOT_COMPILED: Final = ("core/journal.py", "core/migration.py")
#: Set to a non-empty value other than ``0`` to import the pure-Python modules only.
PURE_ENV: Final = "XENSTORED_SIM_PURE"

PACKAGE_DIR: Final = Path(__file__).resolve().parent
REPO_DIR: Final = PACKAGE_DIR.parent
CACHE_DIR: Final = REPO_DIR / ".cache" / "mypyc"
_MANIFEST: Final = "manifest.json"


def sources() -> list[Path]:
    """The compiled modules' source files, in a stable order."""
    skip = {PACKAGE_DIR / name for name in NOT_COMPILED}
    found: set[Path] = set()
    for pattern in COMPILED:
        found.update(p for p in PACKAGE_DIR.glob(pattern) if p.name != "__init__.py")
    return sorted(found - skip)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_DIR).with_suffix("")
    return ".".join(rel.parts)


def build_key(files: Sequence[Path] | None = None) -> str:
    """A hash of everything the build depends on: sources, interpreter, this file."""
    h = hashlib.sha256()
    h.update(sys.version.encode())
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    for path in [Path(__file__).resolve(), *(files if files is not None else sources())]:
        h.update(str(path.relative_to(REPO_DIR)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build_dir() -> Path:
    return CACHE_DIR / build_key()


def disabled() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the extension module of a compiled core module in the matching build."""

    def __init__(self, root: Path, modules: dict[str, str]) -> None:
        self.root = root
        self.modules = modules

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        rel = self.modules.get(fullname)
        if rel is None:
            return None
        origin = str(self.root / rel)
        loader = importlib.machinery.ExtensionFileLoader(fullname, origin)
        return importlib.util.spec_from_file_location(fullname, origin, loader=loader)


_finder: _CompiledFinder | None = None


def install() -> None:
    """Use the compiled modules if a build matching the current sources exists."""
    global _finder
    if _finder is not None or disabled():
        return
    try:
        root = build_dir()
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return  # no matching build: the pure modules are imported
    _finder = _CompiledFinder(root, dict(manifest["modules"]))
    sys.path.append(str(root))  # the shared library the modules' shims import
    sys.meta_path.insert(0, _finder)


def build_kind() -> str:
    """``compiled`` if the compiled core is in use in this process, else ``pure``."""
    install()
    if _finder is None:
        return "pure"
    name = next(iter(_finder.modules))
    mod = sys.modules.get(name) or importlib.import_module(name)
    return "compiled" if str(mod.__file__).endswith(_ext_suffix()) else "pure"


def _ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def build() -> int:
    """Compile the core with mypyc into its keyed cache directory (nothing if it exists)."""
    import shutil
    import subprocess
    import tempfile

    files = sources()
    key = build_key(files)
    final = CACHE_DIR / key
    if (final / _MANIFEST).exists():
        print(f"xenstored-sim: compiled core up to date ({final})")
        return 0
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="tmp-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            PACKAGE_DIR, work / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__")
        )
        rels = [str(p.relative_to(REPO_DIR)) for p in files]
        cmd = [sys.executable, "-m", "mypyc", *rels]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print("xenstored-sim: mypyc failed; the pure-Python core is used", file=sys.stderr)
            return 1
        out = work / "out"
        out.mkdir()
        suffix = _ext_suffix()
        modules: dict[str, str] = {}
        for lib in work.glob(f"*__mypyc{suffix}"):
            shutil.copy2(lib, out / lib.name)
        for src in files:
            rel = src.relative_to(REPO_DIR).with_suffix("")
            ext = (work / rel).with_name(rel.name + suffix)
            dest = out / ext.relative_to(work)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ext, dest)
            modules[module_name(src)] = str(dest.relative_to(out))
        (out / _MANIFEST).write_text(json.dumps({"key": key, "modules": modules}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
    for old in CACHE_DIR.iterdir():
        if old != final and not old.name.startswith("tmp-"):
            shutil.rmtree(old, ignore_errors=True)  # stale builds of older sources
    print(f"xenstored-sim: compiled {len(files)} core modules into {final}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import shutil

    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["build"]:
        if shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") is None:
            print("xenstored-sim: no C compiler; the pure-Python core is used", file=sys.stderr)
            return 0
        return build()
    if args == ["status"]:
        print(build_kind())
        return 0
    print("usage: python -m xenstored_sim.compiled build|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Xen's own ``test-xenstore`` (tools/tests/xenstore, docs/xenstore.md, 'Real clients') against the
daemon.

It comes from Debian's xen-utils-4.17, unpacked by ``scripts/fetch-xen-utils.sh`` (the
``xen_root`` fixture).  Exit status 0 is a pass, 3 a failed test, 2 no connection.
"""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any

import pytest

# The conftest's Daemon; conftest is no module.
Daemon = Any

TESTS = [
    "read 1",
    "read 2000",
    "write 1",
    "write 2000",
    "dir",
    "rm node",
    "rm dir",
    "ta empty",
    "ta empty x",
    "ta rmw",
    "ta rmw x",
    "ta err",
]
# A bound for a hung daemon; each run takes milliseconds.
LIMIT = 60


def run_test_xenstore(xen_root: pathlib.Path, daemon: Daemon, *args: str) -> str:
    env = daemon.client_env()
    env["LD_LIBRARY_PATH"] = str(xen_root / "usr/lib/x86_64-linux-gnu")
    proc = subprocess.run(
        [str(xen_root / "usr/lib/xen-4.17/bin/test-xenstore"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"test-xenstore {args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout


def test_lists_the_twelve_tests(xen_root: pathlib.Path, xenstored: Daemon) -> None:
    out = run_test_xenstore(xen_root, xenstored, "-l")
    assert [line.split(":")[0].strip() for line in out.splitlines()] == TESTS


@pytest.mark.parametrize("name", TESTS)
def test_single(xen_root: pathlib.Path, xenstored: Daemon, name: str) -> None:
    out = run_test_xenstore(xen_root, xenstored, "-t", name)
    assert out.startswith(f"{name:<10}:") and out.rstrip().endswith(" ns"), out


def test_whole_suite(xen_root: pathlib.Path, xenstored: Daemon) -> None:
    out = run_test_xenstore(xen_root, xenstored)
    assert [line.split(":")[0].strip() for line in out.splitlines()] == TESTS


def test_whole_suite_leaves_the_store_clean(xen_root: pathlib.Path, xenstored: Daemon) -> None:
    run_test_xenstore(xen_root, xenstored, "-i", "20")
    # Its final clean-up removes xenstore-test in a transaction once it is empty (docs/xenstore.md,
    # 'Real clients').
    env = xenstored.client_env()
    proc = subprocess.run(
        ["xenstore-exists", "xenstore-test"], env=env, capture_output=True, check=False
    )
    assert proc.returncode != 0


def test_random_run(xen_root: pathlib.Path, xenstored: Daemon) -> None:
    # Random test order for 2 s; it prints nothing and its exit status is the verdict.
    run_test_xenstore(xen_root, xenstored, "-r", "2")

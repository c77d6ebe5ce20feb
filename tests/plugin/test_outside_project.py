"""The pytest plugin as an outside project sees it: the wheel is built, installed into a scratch
virtualenv that has nothing of this checkout, and a small test project there uses the fixtures
with real libxenstore clients, the trio client, guest connections and the whole stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

OUTSIDE_TESTS = """
import subprocess
import shutil

import pytest


def test_xenstore_utils_reach_the_daemon(xenstored_sim):
    write = shutil.which("xenstore-write")
    if write is None:
        pytest.fail("xenstore-utils is not installed")
    subprocess.run([write, "/outside", "hello"], env=xenstored_sim.env, check=True)
    out = subprocess.run(
        ["xenstore-read", "/outside"], env=xenstored_sim.env, check=True, capture_output=True
    )
    assert out.stdout == b"hello\\n"


@pytest.mark.xenstored_sim_args("-E", "3")
def test_quota_flags_reach_the_daemon(xenstored_sim):
    assert xenstored_sim.args == ("-E", "3")


@pytest.mark.parametrize("xenstored_sim", [["-W", "2"]], indirect=True)
def test_indirect_parametrization(xenstored_sim):
    assert xenstored_sim.args == ("-W", "2")


async def test_client_and_guest(xenstore_client, xenstore_guest):
    await xenstore_client.write("/local/domain/7/data", b"x")
    await xenstore_client.set_perms("/local/domain/7/data", ["n7"])
    async with xenstore_guest(7) as guest:
        assert await guest.read("/local/domain/7/data") == b"x"
        with pytest.raises(Exception) as info:
            await guest.write("/secret", b"no")
    assert "EACCES" in str(info.value)


@pytest.mark.xenstored_sim_args("-E", "2")
async def test_guest_quota(xenstore_client, xenstore_guest):
    await xenstore_client.write("/local/domain/9", b"")
    await xenstore_client.set_perms("/local/domain/9", ["n9"])
    async with xenstore_guest(9) as guest:
        await guest.write("/local/domain/9/a", b"1")
        with pytest.raises(Exception) as info:
            for i in range(5):
                await guest.write(f"/local/domain/9/b{i}", b"1")
    assert "ENOSPC" in str(info.value)  # C maps the node quota to ENOSPC


def test_whole_stack(xen_stack):
    created = xen_stack.xl("create", "--name", "outside", "--memory", "16")
    listed = xen_stack.xl("list")
    assert created["domid"] in [d["domid"] for d in listed["domains"]]
"""


def _scratch_venv(tmp: Path) -> Path:
    """A virtualenv that sees this venv's third-party packages but not this checkout."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = Path(
        subprocess.run(
            [sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("physmap_lab", "physmap-lab", "__editable__", "_physmap")):
            continue
        (site / entry.name).symlink_to(entry)
    return venv


def test_plugin_in_an_outside_project(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("physmap_lab-*.whl")
    venv = _scratch_venv(tmp_path)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    project = tmp_path / "outside"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (project / "test_outside.py").write_text(textwrap.dedent(OUTSIDE_TESTS))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    out = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "6 passed" in out.stdout
    # The plugin and the daemon came from the wheel, not from this checkout.
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import physmap_lab, xenstored_sim; print(physmap_lab.__file__, xenstored_sim.__file__)",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(REPO) not in where
    assert shutil.which("xenstored-sim", path=str(venv / "bin"))

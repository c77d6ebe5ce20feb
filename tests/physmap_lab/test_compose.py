"""compose.yaml runs the same stack as the local launcher, and a real validator accepts it."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import tomllib
from typing import Any

import yaml

from physmap_lab.stack import service_commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNDIR = "/run/physmap-lab"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_docker_compose_validates_the_file() -> None:
    tool = shutil.which("docker-compose")
    assert tool is not None, "docker-compose is installed by `make setup`"
    proc = subprocess.run(
        [tool, "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_each_service_runs_the_launchers_command() -> None:
    services = _compose()["services"]
    expected = service_commands(RUNDIR)
    assert set(services) == set(expected)
    for name, argv in expected.items():
        assert services[name]["command"] == argv, name


def test_every_service_shares_the_rundir_volume() -> None:
    for name, service in _compose()["services"].items():
        assert f"rundir:{RUNDIR}" in service["volumes"], name


def test_healthchecks_probe_the_sockets_the_launcher_waits_for() -> None:
    services = _compose()["services"]
    assert services["xenstored"]["healthcheck"]["test"][-1] == f"{RUNDIR}/socket"
    assert services["hypervisor"]["healthcheck"]["test"][-1] == f"{RUNDIR}/hypervisor.sock"


def test_dockerfile_installs_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", dockerfile, re.M), name
    assert "pip install --no-cache-dir ." in dockerfile

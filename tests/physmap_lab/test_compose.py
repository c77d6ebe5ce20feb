"""compose.yaml runs the same stack as the local launcher, on two hosts, from the image that
scripts/build-image.sh builds with no registry; a real validator accepts it.  (``make compose``
runs it under Docker.)"""

from __future__ import annotations

import fnmatch
import importlib.util
import pathlib
import re
import shutil
import subprocess
import tomllib
from typing import Any

import yaml

from physmap_lab.demo import plan
from physmap_lab.stack import PRINCIPALS, principal_socket, service_commands

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNDIR = "/run/physmap-lab"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
BUILD_SCRIPT = (ROOT / "scripts" / "build-image.sh").read_text()


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


HOSTS = ("a", "b")
DAEMONS = ("xenstored", "hypervisor")


def test_each_host_runs_the_launchers_daemons_and_a_runs_the_demo() -> None:
    services = _compose()["services"]
    expected = service_commands(RUNDIR)
    want = {f"{daemon}-{host}": expected[daemon] for host in HOSTS for daemon in DAEMONS}
    want["toolstack-a"] = expected["toolstack"]
    assert set(services) == set(want)
    for name, argv in want.items():
        assert services[name]["command"] == argv, name


def test_daemons_serve_every_principal_its_own_socket_in_the_rundir() -> None:
    expected = service_commands(RUNDIR)
    for daemon in DAEMONS:
        argv = expected[daemon]
        given = [argv[i + 1] for i, a in enumerate(argv) if a == "--principal-socket"]
        assert given == [f"{p}={principal_socket(RUNDIR, p, daemon)}" for p in PRINCIPALS], daemon
        assert all(spec.split("=", 1)[1].startswith(f"{RUNDIR}/") for spec in given)


def test_each_host_has_a_run_volume_of_its_own() -> None:
    data = _compose()
    for name, service in data["services"].items():
        host = name.rsplit("-", 1)[1]
        assert service["volumes"] == [f"run-{host}:{RUNDIR}"], name
    assert set(data["volumes"]) == {f"run-{host}" for host in HOSTS}


def test_both_hosts_share_one_network_and_the_demo_waits_for_both() -> None:
    data = _compose()
    assert set(data["networks"]) == {"xen"}
    for name, service in data["services"].items():
        assert service["networks"] == ["xen"], name
    waits = data["services"]["toolstack-a"]["depends_on"]
    assert set(waits) == {f"{d}-{h}" for d in DAEMONS for h in HOSTS}
    assert all(w["condition"] == "service_healthy" for w in waits.values())


def test_healthchecks_probe_the_sockets_the_launcher_waits_for() -> None:
    services = _compose()["services"]
    for host in HOSTS:
        assert services[f"xenstored-{host}"]["healthcheck"]["test"][-1] == f"{RUNDIR}/socket"
        assert (
            services[f"hypervisor-{host}"]["healthcheck"]["test"][-1] == f"{RUNDIR}/hypervisor.sock"
        )


def test_every_service_runs_the_locally_built_image() -> None:
    base = re.search(r"^BASE=\$\{PHYSMAP_LAB_BASE:-(\S+)\}$", BUILD_SCRIPT, re.M)
    image = re.search(r"^IMAGE=\$\{PHYSMAP_LAB_IMAGE:-(\S+)\}$", BUILD_SCRIPT, re.M)
    assert base is not None and image is not None
    for name, service in _compose()["services"].items():
        assert service["image"] == image.group(1), name
        assert "build" not in service, name
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert froms == [base.group(1)]


def test_the_image_installs_the_host_built_wheelhouse_without_an_index() -> None:
    installs = re.findall(r"pip install ([^&]*)", DOCKERFILE.replace("\\\n", " "))
    assert installs, "the Dockerfile installs wheels"
    assert all("--no-index" in cmd for cmd in installs)
    assert "pip wheel -q --no-deps --wheel-dir" in BUILD_SCRIPT  # the project
    assert 'pip wheel -q --wheel-dir "$WHEELS/deps"' in BUILD_SCRIPT  # its dependencies
    assert "debootstrap --variant=minbase" in BUILD_SCRIPT


def test_the_wheel_holds_the_package_of_every_console_script() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {pattern.rstrip("*") for pattern in include}
    for script, target in project["project"]["scripts"].items():
        assert target.split(".", 1)[0] in shipped, script
    assert all((ROOT / name / "__init__.py").exists() for name in shipped)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for .dockerignore: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, body) or path.startswith(body.rstrip("/") + "/"):
            ignored = not negate
    return ignored


def test_the_build_context_is_the_wheelhouse_alone() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".venv", ".cache", ".git", "tests", "build/lib", "xenstored_sim", "README.md"):
        assert _ignored(path, patterns), path
    for source in re.findall(r"^COPY (\S+) ", DOCKERFILE, re.M):
        assert not _ignored(f"{source}/x.whl", patterns), source


def _checker() -> Any:
    spec = importlib.util.spec_from_file_location(
        "check_compose_demo", ROOT / "scripts" / "check-compose-demo.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs() -> list[dict[str, Any]]:
    runs = []
    for case in plan():
        compat = case.mode == "compat"
        ops = {"toolstack": 7 if compat else 1, "device-model": 8 if compat else 0, "guest": 0}
        runs.append(
            {"mode": case.mode, "device": case.device, "toolstack": case.toolstack,
             "ok": True, "expected_ok": True, "error": None, "physmap_xenstore_ops": ops}
        )  # fmt: skip
    return runs


def test_the_compose_check_judges_the_demo_and_the_attribution() -> None:
    problems = _checker().problems
    assert problems({"runs": _runs()}) == []
    assert problems({"runs": _runs()[1:]})[0].startswith("cases ran")
    assert problems([]) == ['not {"runs": [...]}']
    broken = _runs()
    broken[0].update(ok=False, error="fb differs")
    assert problems({"runs": broken}) == [
        f"{broken[0]['mode']}/{broken[0]['device']}/libxl: ok=False expected True: fb differs"
    ]
    # What the audit says when SO_PEERCRED sees pid 0 and no principal socket was used.
    blind = _runs()
    for r in blind:
        ops = r["physmap_xenstore_ops"]
        ops["other"] = ops.pop("device-model") + ops["toolstack"]
        ops["device-model"], ops["toolstack"] = 0, 0
    found = problems({"runs": blind})
    assert any("no known principal" in p for p in found)
    assert any("compat physmap requests not attributed" in p for p in found)

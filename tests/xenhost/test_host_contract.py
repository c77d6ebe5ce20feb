"""The host contract: the run-directory layout of docs/architecture.md and the process helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import xenhost
from xenhost import RunDir


def test_the_layout_is_the_documented_one() -> None:
    run = RunDir("/run/x")
    got = {
        "xenstored": run.xenstored_socket,
        "guest": run.guest_socket(3),
        "hypervisor": run.hypervisor_socket,
        "memory": run.guest_memory(3),
        "qmp": run.qmp_socket(3),
        "audit": run.audit_log("xenstored"),
        "dm": run.dm_log(3),
        "ts-xs": run.principal_socket("toolstack", "xenstored"),
        "dm-hv": run.principal_socket("device-model", "hypervisor"),
    }
    assert {k: str(v) for k, v in got.items()} == {
        "xenstored": "/run/x/socket",
        "guest": "/run/x/domains/3.sock",
        "hypervisor": "/run/x/hypervisor.sock",
        "memory": "/run/x/mem/dom3.mem",
        "qmp": "/run/x/qmp/3.sock",
        "audit": "/run/x/audit/xenstored.jsonl",
        "dm": "/run/x/dm/3.log",
        "ts-xs": "/run/x/principals/toolstack/socket",
        "dm-hv": "/run/x/principals/device-model/hypervisor.sock",
    }
    assert run == RunDir(Path("/run/x/"))


def test_every_documented_path_is_named_by_the_contract() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    table = doc.split("## Run directory (RUNDIR)")[1].split("\n## ")[0]
    for name in ("`socket`", "`domains/<domid>.sock`", "`hypervisor.sock`", "`qmp/<domid>.sock`"):
        assert name in table
    for name in ("`mem/dom<domid>.mem`", "`audit/xenstored.jsonl`", "`dm/<domid>.log`"):
        assert name in table


def test_accepts_only_a_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    assert not xenhost.accepts(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        assert not xenhost.accepts(path)  # bound, not listening
        s.listen()
        assert xenhost.accepts(path)
        assert xenhost.accepts(str(path))
    assert not xenhost.accepts(tmp_path / "absent")


def test_executable_names_what_is_missing() -> None:
    assert Path(xenhost.executable("xl-sim")).name == "xl-sim"
    with pytest.raises(FileNotFoundError, match=r"^no-such-program is not installed \(hint\)$"):
        xenhost.executable("no-such-program", " (hint)")


def test_xl_json_argv() -> None:
    argv = xenhost.xl_json_argv(Path("/r"), "list", program="xl")
    assert argv == ["xl", "--rundir", "/r", "--json", "list"]


def test_device_models_are_found_by_their_command_line(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-model"
    fake.write_text("import time\ntime.sleep(60)\n")
    run = tmp_path / "run"
    argv = [sys.executable, str(fake), "--domid", "5", "--rundir", str(run)]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in xenhost.device_models(run) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert xenhost.device_model_domains(run) == {proc.pid: 5}
        assert xenhost.device_models(run, [5]) == [proc.pid]
        assert xenhost.device_models(run, [6]) == []
        assert xenhost.device_models(tmp_path) == []
        os.kill(proc.pid, signal.SIGKILL)
        while (Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0]) != "Z":
            time.sleep(0.01)
        assert xenhost.device_models(run) == []  # a zombie, not yet reaped
    finally:
        proc.kill()
        proc.wait()
    assert xenhost.device_models(run) == []

"""The QMP line codec, the device model's command line and xl-sim's argument handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolstack.cli import build_parser
from toolstack.config import ConfigError, DomainConfig, parse_config
from toolstack.devicemodel import dm_argv
from toolstack.qmp import QmpParser, QmpProtocolError, command

XL_SIM = str(Path(sys.executable).parent / "xl-sim")


def test_parser_splits_lines_and_keeps_partial_ones() -> None:
    p = QmpParser()
    p.receive_data(b'{"QMP": {"version": {}}}\r\n{"return"')
    assert p.next_message() == {"QMP": {"version": {}}}
    assert p.next_message() is None
    p.receive_data(b': {}, "id": 1}\n\n')
    assert p.next_message() == {"return": {}, "id": 1}
    assert p.next_message() is None


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n"])
def test_parser_rejects_non_objects(line: bytes) -> None:
    p = QmpParser()
    p.receive_data(line)
    with pytest.raises(QmpProtocolError):
        p.next_message()


def test_command_lines_carry_arguments_and_id() -> None:
    line = command("xen-save-devices-state", {"filename": "/x", "live": False}, 4)
    assert line.endswith(b"\r\n")
    assert json.loads(line) == {
        "execute": "xen-save-devices-state",
        "arguments": {"filename": "/x", "live": False},
        "id": 4,
    }
    assert json.loads(command("stop", None, 5)) == {"execute": "stop", "id": 5}


def test_dm_argv_follows_libxl_for_restrict_and_restore() -> None:
    cfg = DomainConfig(vga="qxl", dm_mode="compat", memory_mib=32)
    argv = dm_argv(cfg, 3, "/run", "/run/socket", "/run/hypervisor.sock")
    assert argv == [
        "--domid", "3", "--xen-mode", "compat", "--qemu-version", "2.10", "--vga", "qxl",
        "--rundir", "/run", "--xenstore", "/run/socket", "--hypervisor", "/run/hypervisor.sock",
        "--memory-mib", "32", "--vram-mib", "64",
    ]  # fmt: skip
    restricted = dm_argv(
        DomainConfig(dm_restrict=True),
        3,
        "/run",
        "/run/socket",
        "/run/hypervisor.sock",
        incoming="/run/lib/q",
    )
    assert restricted[-4:] == ["--restrict", "-S", "--incoming", "/run/lib/q"]
    later = dm_argv(DomainConfig(dm_qemu_version="3.0"), 3, "/run", "/run/socket", "/run/hv.sock")
    assert later[later.index("--qemu-version") + 1] == "3.0"


def test_device_model_qemu_version_is_an_xl_cfg_key() -> None:
    cfg = parse_config('device_model_qemu_version = "current"\n')
    assert cfg.dm_qemu_version == "current"
    assert DomainConfig().dm_qemu_version == "2.10"
    with pytest.raises(ConfigError, match="device_model_qemu_version must be one of"):
        parse_config('device_model_qemu_version = "2.9"\n')


def test_global_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    a = parser.parse_args(["--rundir", "/r", "--json", "save", "--checkpoint", "3", "f"])
    b = parser.parse_args(["save", "3", "f", "--rundir", "/r", "--json", "--checkpoint"])
    for args in (a, b):
        assert (args.rundir, args.json, args.domid, args.file, args.checkpoint) == (
            "/r", True, 3, "f", True,
        )  # fmt: skip
    g = parser.parse_args(["guest", "2", "draw", "--seed", "9"])
    assert (g.action, g.seed, g.addr, g.width) == ("draw", 9, 0xF0000000, 1024)


def test_xl_sim_reports_errors_as_json(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [XL_SIM, "--rundir", str(tmp_path), "--json", "list"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot reach hypervisor-sim" in json.loads(proc.stdout)["error"]
    cfg = tmp_path / "bad.cfg"
    cfg.write_text('vga = "ega"\n')
    proc = subprocess.run(
        [XL_SIM, "--rundir", str(tmp_path), "--json", "create", str(cfg)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"].startswith(f"{cfg}: vga must be one of")
    proc = subprocess.run([XL_SIM, "list"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no run directory" in proc.stderr

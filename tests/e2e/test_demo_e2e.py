"""End to end: ``physmap-lab demo --json`` runs the whole stack (xenstored-sim, hypervisor-sim,
an ``xl-sim`` process per toolstack step, a ``qemu-model`` per domain) and its report holds.

One default demo run (two modes by three devices) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from hypervisor_sim import guest_drivers
from physmap_lab.demo import BAR_ADDR, BPP, HEIGHT, WIDTH, Case
from physmap_lab.stack import executable, open_stack
from xenhost import RunDir

pytestmark = pytest.mark.e2e

PHYSMAP_LAB = executable("physmap-lab")
PROGRAMS = ("xenstored-sim", "hypervisor-sim", "qemu-model", "xl-sim")


@dataclass
class Demo:
    proc: subprocess.CompletedProcess[str]
    runs: list[dict[str, Any]]
    tmpdir: Path
    shots: Path


def processes_mentioning(text: str) -> list[int]:
    """Pids of our programs whose command line mentions ``text`` (a run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(Path(a).name in PROGRAMS for a in args[:2]) and any(text in a for a in args):
            found.append(int(entry.name))
    return found


def _end(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmpdir = tmp_path_factory.mktemp("demo-tmp")
    shots = tmp_path_factory.mktemp("demo-shots")
    # The demo's temporary run directory goes under TMPDIR, so the test can see it go.
    env = dict(os.environ, TMPDIR=str(tmpdir))
    try:
        proc = subprocess.run(
            [PHYSMAP_LAB, "demo", "--json", "--screenshots", str(shots)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert isinstance(out, dict)
        yield Demo(proc, out["runs"], tmpdir, shots)
    finally:
        _end(processes_mentioning(str(tmpdir)))


def _by_mode(demo: Demo, mode: str) -> list[dict[str, Any]]:
    runs = [r for r in demo.runs if r["mode"] == mode]
    assert runs, mode
    return runs


def test_stdout_is_only_the_runs(demo: Demo) -> None:
    assert list(json.loads(demo.proc.stdout)) == ["runs"]
    assert [(r["mode"], r["device"], r["toolstack"]) for r in demo.runs] == [
        (m, d, "libxl") for m in ("new", "compat") for d in ("stdvga", "cirrus", "qxl")
    ]


def test_every_case_works(demo: Demo) -> None:
    for r in demo.runs:
        assert r["ok"] is True and r["error"] is None, r
        assert r["dm"] == r["mode"]
        assert r["derived_ptrs_valid"] is True


def test_the_framebuffer_survives_save_and_restore(demo: Demo) -> None:
    for r in demo.runs:
        drawn = r["fb_sha256_expected"]
        assert len(drawn) == 64
        assert (
            r["fb_sha256_saved"]
            == r["fb_sha256_dm_saved"]
            == r["fb_sha256_restored"]
            == r["fb_sha256_guest_restored"]
            == drawn
        ), r
    # Each case drew a picture of its own, so no case can pass on another's pixels.
    assert len({r["fb_sha256_saved"] for r in demo.runs}) == len(demo.runs)


def test_screenshots_show_the_drawn_pixels_before_save_and_after_restore(demo: Demo) -> None:
    shots = demo.shots
    for r in demo.runs:
        case = Case(r["mode"], r["device"], r["toolstack"])
        _, length = guest_drivers.framebuffer(r["device"], BAR_ADDR, WIDTH, HEIGHT, BPP)
        raw = guest_drivers.pattern_bytes(case.seed, length)[: WIDTH * HEIGHT * 4]
        rgb = bytearray(WIDTH * HEIGHT * 3)  # the guest's B, G, R, X as R, G, B
        rgb[0::3], rgb[1::3], rgb[2::3] = raw[2::4], raw[1::4], raw[0::4]
        for when in ("before-save", "after-restore"):
            with Image.open(shots / f"{case.name}-{when}.png") as img:
                assert (img.format, img.size) == ("PNG", (WIDTH, HEIGHT))
                assert img.tobytes() == rgb, (case.label, when)


def test_new_mode_keeps_the_vram_pointer_from_init(demo: Demo) -> None:
    # The dummy mapping handed out at init is replaced in place (docs/qemu-physmap.md, 'The
    # mapcache').
    for r in _by_mode(demo, "new"):
        assert isinstance(r["vram_ptr_at_init"], int) and r["vram_ptr_at_init"] > 0
        assert r["vram_ptr_at_init"] == r["vram_ptr_after_load"], r


def test_only_compat_images_carry_the_physmap_keys(demo: Demo) -> None:
    for r in demo.runs:
        records = r["image_records"]
        assert records[0] == "LIBXC_CONTEXT" and records[-1] == "END"
        assert "EMULATOR_CONTEXT" in records
        if r["mode"] == "compat":
            assert "EMULATOR_XENSTORE_DATA" in records, r
            assert any(k.startswith("physmap/") for k in r["xenstore_keys_saved"])
        else:
            assert "EMULATOR_XENSTORE_DATA" not in records, r
            assert r["xenstore_keys_saved"] == {}


def test_new_mode_keeps_the_physmap_out_of_xenstore(demo: Demo) -> None:
    for r in _by_mode(demo, "new"):
        ops, ok = r["physmap_xenstore_ops"], r["physmap_xenstore_ops_ok"]
        assert set(ops) == {"toolstack", "device-model", "guest"}
        # Nobody reads or writes a physmap key: the device model and the guest send nothing,
        # and the toolstack's save only lists the directory and finds none (libxl
        # docs/qemu-physmap.md, 'libxl: save').
        assert ok == {"toolstack": 0, "device-model": 0, "guest": 0}, r
        assert ops["device-model"] == ops["guest"] == 0, r
        assert ops["toolstack"] <= 1, r
        assert r["dm_physmap_ops"] == {"saved": 0, "restored": 0}


def test_compat_mode_couples_the_toolstack_and_the_device_model(demo: Demo) -> None:
    for r in _by_mode(demo, "compat"):
        ok = r["physmap_xenstore_ops_ok"]
        # The device model writes the keys, the toolstack saves and plants them, the
        # restored device model reads them back (docs/qemu-physmap.md, 'The keys').
        assert ok["device-model"] > 0 and ok["toolstack"] > 0, r
        assert ok["guest"] == 0
        assert r["dm_physmap_ops"]["saved"] > 0 and r["dm_physmap_ops"]["restored"] > 0


def test_nothing_is_left_behind(demo: Demo) -> None:
    # The temporary run directory is gone, and with it every socket and memory file.
    assert list(demo.tmpdir.iterdir()) == []
    assert processes_mentioning(str(demo.tmpdir)) == []


def test_progress_and_elapsed_time_go_to_stderr(demo: Demo) -> None:
    err = demo.proc.stderr
    assert "new/qxl/libxl: restored as domain" in err
    assert "6 cases, 6 ok, 0 failed unexpectedly, in " in err


async def test_attach_uses_the_daemons_already_running(tmp_path: Path) -> None:
    """The compose toolstack service: the demo on a RUNDIR whose daemons someone else runs."""
    rundir = tmp_path / "run"
    async with open_stack(rundir, audit=True) as stack:
        argv = [PHYSMAP_LAB, "demo", "--json", "--rundir", str(rundir), "--attach"]
        with trio.fail_after(120):
            proc = await trio.run_process(
                [*argv, "--mode", "new", "--device", "qxl"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert proc.returncode == 0, proc.stderr.decode()
        (run,) = json.loads(proc.stdout)["runs"]
        assert run["ok"] is True, run
        # The daemons still run, and the case left nothing of its own behind.
        for daemon in stack.daemons.values():
            assert daemon.process is not None and daemon.process.returncode is None
        daemons = sorted(d.pid for d in stack.daemons.values())
        assert sorted(processes_mentioning(str(rundir))) == daemons
        assert list(RunDir(rundir).memory_dir.glob("*.mem")) == []
        assert list(RunDir(rundir).qmp_dir.glob("*.sock")) == []
        assert list((rundir / "images").iterdir()) == []
        assert RunDir(rundir).audit_log("toolstack").stat().st_size > 0
    assert processes_mentioning(str(rundir)) == []

"""Every console script turns a bad path, file, number or flag into one line on stderr that
names what is wrong, with exit status 2 (usage) or 1 (run time): never a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# (argv, exit status, a word the line must contain); {d} is a fresh empty directory, {f} a
# regular file in it.  /sys stands for a directory nobody may create files in (root included).
CASES: list[tuple[str, int, str]] = [
    # xenstored-sim
    ("xenstored-sim --rundir /proc/nope", 1, "/proc/nope"),
    ("xenstored-sim --rundir {f}", 1, "{f}"),
    ("xenstored-sim --rundir {d} --socket /proc/nope/sock", 1, "/proc/nope/sock"),
    ("xenstored-sim --rundir {d} --socket {f}", 1, "not a socket"),
    ("xenstored-sim --rundir {d} --state-dir /proc/nope", 1, "/proc/nope"),
    ("xenstored-sim --rundir {d} --state-dir {f}", 1, "not a directory"),
    ("xenstored-sim --rundir {d} --sync sometimes", 2, "--sync"),
    ("xenstored-sim --rundir {d} --journal-max lots", 2, "--journal-max"),
    ("xenstored-sim --rundir {d} --journal-max -5", 2, "--journal-max"),
    ("xenstored-sim --rundir {d} --audit-log /proc/nope/x.jsonl", 1, "/proc/nope"),
    ("xenstored-sim --rundir {d} --audit-log {d}", 1, "{d}"),
    ("xenstored-sim --rundir {d} --audit-log /sys/x.jsonl", 1, "/sys/x.jsonl"),
    ("xenstored-sim --rundir {d} --live-update-state 999", 2, "--live-update-state"),
    ("xenstored-sim --rundir {d} -E many", 2, "--entry-nb"),
    ("xenstored-sim --rundir {d} -S -1", 2, "quota"),
    ("xenstored-sim --rundir {d} -W x", 2, "--watch-nb"),
    ("xenstored-sim --rundir {d} -t x", 2, "--transaction"),
    ("xenstored-sim --rundir {d} -A x", 2, "--perm-nb"),
    ("xenstored-sim --rundir {d} -M x", 2, "--path-max"),
    ("xenstored-sim --rundir {d} -Q nodes", 2, "NAME=VALUE"),
    ("xenstored-sim --rundir {d} -Q bogus=3", 2, "quota"),
    ("xenstored-sim --rundir {d} -q memory=0", 2, "quota"),
    ("xenstored-sim --rundir {d} -w watch-event=x", 2, "NAME=VALUE"),
    ("xenstored-sim --rundir {d} -w other=1", 2, "other"),
    ("xenstored-sim --rundir {d} --bogus", 2, "--bogus"),
    # hypervisor-sim
    ("hypervisor-sim", 2, "--rundir"),
    ("hypervisor-sim --rundir /proc/nope", 1, "/proc/nope"),
    ("hypervisor-sim --rundir {f}", 1, "{f}"),
    ("hypervisor-sim --rundir /sys", 1, "/sys"),
    ("hypervisor-sim --rundir {d} --xen-libs latest", 2, "--xen-libs"),
    ("hypervisor-sim --rundir {d} --audit-log {f}/x", 1, "{f}/x"),
    ("hypervisor-sim --rundir {d} --audit-log {d}", 1, "{d}"),
    ("hypervisor-sim --rundir {d} --bogus", 2, "--bogus"),
    # qemu-model
    ("qemu-model --rundir {d}", 2, "--domid"),
    ("qemu-model --domid x --rundir {d}", 2, "--domid"),
    ("qemu-model --domid 0 --rundir {d}", 2, "--domid"),
    ("qemu-model --domid 1", 2, "--rundir"),
    ("qemu-model --domid 1 --rundir /proc/nope", 2, "/proc/nope"),
    ("qemu-model --domid 1 --rundir {f}", 2, "{f}"),
    ("qemu-model --domid 1 --rundir {d}", 1, "{d}/hypervisor.sock"),
    ("qemu-model --domid 1 --rundir {d} --xen-mode old", 2, "--xen-mode"),
    ("qemu-model --domid 1 --rundir {d} --vga ega", 2, "--vga"),
    ("qemu-model --domid 1 --rundir {d} --memory-mib 0", 2, "--memory-mib"),
    ("qemu-model --domid 1 --rundir {d} --vram-mib 3", 2, "--vram-mib"),
    ("qemu-model --domid 1 --rundir {d} --vram-mib x", 2, "--vram-mib"),
    ("qemu-model --domid 1 --rundir {d} --incoming {d}/none", 1, "hypervisor.sock"),
    # xl-sim (no daemons on {d}: every command that needs one says which)
    ("xl-sim list", 2, "--rundir"),
    ("xl-sim --rundir /proc/nope list", 1, "/proc/nope"),
    ("xl-sim --rundir {f} list", 1, "{f}"),
    ("xl-sim --rundir {d} list", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} create {d}/none.cfg", 1, "{d}/none.cfg"),
    ("xl-sim --rundir {d} create {d}", 1, "{d}"),
    ("xl-sim --rundir {d} create --memory lots", 2, "--memory"),
    ("xl-sim --rundir {d} create --videoram x", 2, "--videoram"),
    ("xl-sim --rundir {d} create --vga ega", 2, "--vga"),
    ("xl-sim --rundir {d} create --dm-mode old", 2, "--dm-mode"),
    ("xl-sim --rundir {d} create --toolstack xm", 2, "--toolstack"),
    ("xl-sim --rundir {d} destroy 0", 2, "domid"),
    ("xl-sim --rundir {d} unpause 1", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} destroy 1", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} save 1", 2, "file"),
    ("xl-sim --rundir {d} save 1 /proc/nope/f", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} restore {d}/none.img", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} restore x --dm-mode old", 2, "--dm-mode"),
    ("xl-sim --rundir {d} guest 1 warp", 2, "warp"),
    ("xl-sim --rundir {d} guest 1 set-mode --width wide", 2, "--width"),
    ("xl-sim --rundir {d} guest 1 draw", 2, "--seed"),
    ("xl-sim --rundir {d} guest 1 map-bar --addr x", 2, "--addr"),
    ("xl-sim --rundir {d} --json list", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} frobnicate", 2, "frobnicate"),
    ("xl-sim --rundir {d} migrate 0 127.0.0.1:1", 2, "domid"),
    ("xl-sim --rundir {d} migrate 1 nohost", 2, "ADDRESS:PORT"),
    ("xl-sim --rundir {d} migrate 1 127.0.0.1:99999", 2, "127.0.0.1:99999"),
    ("xl-sim --rundir {d} migrate 1 127.0.0.1:1 --max-rounds 0", 2, "--max-rounds"),
    ("xl-sim --rundir {d} migrate 1 127.0.0.1:1 --dirty-threshold -1", 2, "--dirty-threshold"),
    ("xl-sim --rundir {d} migrate 1 127.0.0.1:1", 1, "hypervisor.sock"),
    ("xl-sim --rundir {d} migrate-receive --listen x", 2, "--listen"),
    ("xl-sim --rundir {d} migrate-receive --bogus", 2, "--bogus"),
    # physmap-lab
    ("physmap-lab", 2, "COMMAND"),
    ("physmap-lab demo --rundir /proc/nope", 1, "/proc/nope"),
    ("physmap-lab demo --rundir {f}", 1, "{f}"),
    ("physmap-lab demo --attach", 2, "--rundir"),
    ("physmap-lab demo --mode old", 2, "--mode"),
    ("physmap-lab demo --device ega", 2, "--device"),
    ("physmap-lab demo --toolstack xm", 2, "--toolstack"),
    ("physmap-lab audit --out /proc/nope", 1, "/proc/nope"),
    ("physmap-lab audit --out {f}", 1, "{f}"),
    ("physmap-lab audit --out /sys/report", 1, "/sys/report"),
    ("physmap-lab audit --repeats 0", 2, "--repeats"),
    ("physmap-lab audit --repeats x", 2, "--repeats"),
    ("physmap-lab audit --mode old", 2, "--mode"),
    ("physmap-lab host up", 2, "name"),
    ("physmap-lab host up a/b --rundir {d}/h", 2, "a/b"),
    ("physmap-lab host down .x", 2, ".x"),
    ("physmap-lab host up x --rundir {f}", 1, "{f}: not a directory"),
    ("physmap-lab host down x --rundir {f}", 1, "not running"),
    ("physmap-lab host down x --rundir {d}/none", 1, "not running"),
    ("physmap-lab host up x --rundir {d}/" + "a" * 110, 1, "sun_path"),
    ("physmap-lab demo --migrate --rundir {f}", 1, "not a directory"),
]


def run_in_own_group(argv: list[str]) -> tuple[int, str]:
    """Run a command in a process group of its own; whatever it started (a daemon that
    should have refused to start) is killed with it."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        stderr += "\n(still running after 60 s)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr


@pytest.mark.parametrize(("command", "status", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path: Path, command: str, status: int, names: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "file"
    f.write_text("not what was expected\n")
    values = {"d": str(d), "f": str(f)}
    argv = [part.format(**values) for part in command.split()]
    argv[0] = str(BIN / argv[0])
    returncode, stderr = run_in_own_group(argv)
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert returncode == status, stderr
    assert names.format(**values) in lines[0]


def test_refused_host_commands_create_nothing(tmp_path: Path) -> None:
    """``host down`` of a host never started, and a bad host name, leave no directory."""
    for action, name in (("down", "x"), ("up", "a/b"), ("down", "a/b")):
        rundir = tmp_path / f"{action}-{len(name)}"
        argv = [str(BIN / "physmap-lab"), "host", action, name, "--rundir", str(rundir)]
        returncode, stderr = run_in_own_group(argv)
        assert returncode != 0, stderr
        assert not rundir.exists(), argv


def test_host_default_rundir_under_a_file(tmp_path: Path) -> None:
    """``$PHYSMAP_LAB_HOSTS`` naming a file: one line naming the directory, no errno."""
    (tmp_path / "file").write_text("")
    env = {**os.environ, "PHYSMAP_LAB_HOSTS": str(tmp_path / "file")}
    proc = subprocess.run(
        [str(BIN / "physmap-lab"), "host", "up", "z"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"physmap-lab: error: {tmp_path}/file/z: Not a directory\n"


def test_demo_migrate_host_that_does_not_start(tmp_path: Path) -> None:
    """A host of ``demo --migrate`` that will not start: its reason, after one error prefix."""
    rundir = tmp_path / ("r" * 110)
    argv = [str(BIN / "physmap-lab"), "demo", "--migrate", "--rundir", str(rundir)]
    returncode, stderr = run_in_own_group([*argv, "--mode", "new", "--device", "stdvga"])
    assert "Traceback" not in stderr, stderr
    assert returncode == 1, stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("physmap-lab: error: host src did not start:"), stderr
    assert last.count("error:") == 1 and "sun_path" in last, stderr


async def test_vnc_unix_socket_that_cannot_be_bound_is_named() -> None:
    """``-vnc unix:PATH`` whose directory is missing: the message names the address, as the
    TCP case does (qemu-model prints it as "Failed to start VNC server: ...")."""
    from qemu_model.ui.vnc import open_vnc_listener
    from qemu_model.ui.vnc_display import parse_vnc

    addr = parse_vnc("unix:/proc/nope/vnc")
    assert addr is not None
    with pytest.raises(OSError, match="unix:/proc/nope/vnc: No such file or directory"):
        await open_vnc_listener(addr)


def _processes_on(rundir: Path) -> list[int]:
    """Pids whose command line names ``rundir`` (a fresh temporary path: ours alone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(rundir).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def test_two_host_ups_at_once_start_one_host(tmp_path: Path) -> None:
    """The second ``host up`` of one run directory refuses; ``host down`` then leaves nothing
    (before, both supervisors came up and ``host down`` stopped only the recorded one)."""
    rundir = tmp_path / "h"
    argv = [str(BIN / "physmap-lab"), "host", "up", "h", "--rundir", str(rundir)]
    ups = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        errs = [p.communicate(timeout=60)[1] for p in ups]
        results = sorted(zip([p.returncode for p in ups], errs, strict=True))
        assert [rc for rc, _ in results] == [0, 1], results
        assert "already runs" in results[1][1], results
    finally:
        down = [str(BIN / "physmap-lab"), "host", "down", "h", "--rundir", str(rundir)]
        subprocess.run(down, stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
        left = _processes_on(rundir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == []

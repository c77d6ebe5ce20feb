"""Defects found by using the stack as an outsider would, each kept as a plain test."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

import xenhost
from physmap_lab.stack import Stack, XlSim, open_stack, start_daemon
from toolstack import devicemodel
from xenhost import RunDir

from .conftest import BIN

MODE = ("--width", "320", "--height", "200", "--bpp", "32")


def alive(stack: Stack, name: str) -> bool:
    proc = stack.daemons[name].process
    return proc is not None and proc.returncode is None and proc.poll() is None


@pytest.mark.parametrize(
    ("access", "then"),
    [(("xs-read", "name"), "destroy"), (("xs-write", "data/k", "v"), "save")],
)
async def test_guest_xenstore_access_then_destroy_or_save_keeps_the_hypervisor(
    stack: Stack, xl: XlSim, tmp_path: Path, access: tuple[str, ...], then: str
) -> None:
    keep = (await xl("create", "--name", "keep", "--memory", "16"))["domid"]
    domid = (await xl("create", "--name", "g", "--memory", "16"))["domid"]
    await xl("guest", str(domid), *access)
    args = [str(domid)] if then == "destroy" else [str(domid), str(tmp_path / "g.img")]
    await xl(then, *args)
    assert alive(stack, "hypervisor")
    listed = (await xl("list"))["domains"]
    assert [(d["domid"], d["name"]) for d in listed] == [(keep, "keep")]
    assert (await xl("guest", str(keep), "xs-read", "name"))["value"] == "keep"


@pytest.mark.parametrize("command", ["destroy", "save"])
async def test_destroy_or_save_without_a_hypervisor_fails(
    stack: Stack, xl: XlSim, tmp_path: Path, command: str
) -> None:
    domid = (await xl("create", "--memory", "16"))["domid"]
    proc = stack.daemons["hypervisor"].process
    assert proc is not None
    proc.kill()
    await proc.wait()
    args = [str(domid)] if command == "destroy" else [str(domid), str(tmp_path / "x.img")]
    rc, out, err = await xl.run(command, *args)
    assert rc == 1 and "hypervisor" in out["error"]
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def second(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / argv[0]), *argv[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("daemon", ["xenstored", "hypervisor"])
async def test_a_second_daemon_refuses_a_live_socket_and_leaves_it(
    stack: Stack, xl: XlSim, daemon: str
) -> None:
    first = stack.daemons[daemon]
    # Started as the launcher starts it: xenstored-sim with no client's XENSTORED_PATH.
    env = stack.env()
    if daemon == "xenstored":
        env = {k: v for k, v in env.items() if not k.startswith("XENSTORED_")}
    proc = await trio.to_thread.run_sync(second, first.argv, env)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{first.argv[0]}: {first.socket_path} is in use: pid {first.pid} answers on it"
    ]
    assert first.socket_path.is_socket()
    await xl("create", "--memory", "16")  # the first still serves


@pytest.mark.parametrize("daemon", ["xenstored", "hypervisor"])
async def test_a_stale_socket_is_replaced(stack: Stack, daemon: str) -> None:
    first = stack.daemons[daemon]
    assert first.process is not None
    first.process.kill()
    await first.process.wait()
    assert first.socket_path.is_socket()  # left behind by the killed daemon
    env = stack.env()
    if daemon == "xenstored":  # as the launcher starts it: no client's XENSTORED_PATH
        env = {k: v for k, v in env.items() if not k.startswith("XENSTORED_")}
    with subprocess.Popen([str(BIN / first.argv[0]), *first.argv[1:]], env=env) as proc:
        try:
            with trio.fail_after(30):
                while not _accepts(first.socket_path):
                    assert proc.poll() is None
                    await trio.sleep(0.02)
        finally:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0
    assert not first.socket_path.exists()  # removed at exit: it was its own


_accepts = xenhost.accepts


def test_a_socket_replaced_after_bind_is_not_removed(tmp_path: Path) -> None:
    from xenstored_sim.startup import listen_unix

    path = str(tmp_path / "s.sock")
    mine = listen_unix(path)
    mine.sock.close()
    os.unlink(path)
    theirs = listen_unix(path)  # a successor's socket at the same path
    try:
        mine.remove()
        assert os.path.exists(path)
        theirs.remove()
        assert not os.path.exists(path)
    finally:
        theirs.sock.close()


async def test_a_failed_second_device_model_keeps_the_first_ones_qmp_socket(
    stack: Stack, xl: XlSim, tmp_path: Path
) -> None:
    domid = (await xl("create", "--memory", "16"))["domid"]
    qmp = RunDir(stack.rundir).qmp_socket(domid)
    argv = ["qemu-model", "--domid", str(domid), "--rundir", str(stack.rundir)]
    proc = await trio.to_thread.run_sync(second, argv, stack.env())
    assert proc.returncode == 1 and "EEXIST" in proc.stderr
    assert qmp.is_socket()
    await xl("save", str(domid), str(tmp_path / "d.img"))
    assert (await xl("list"))["domains"] == []


async def test_xenstored_creates_the_audit_log_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = RunDir(run).audit_log("xenstored")
    argv = [str(BIN / "xenstored-sim"), "--rundir", str(run), "--audit-log", str(log)]
    with subprocess.Popen(argv) as proc:
        try:
            with trio.fail_after(30):
                while not _accepts(RunDir(run).xenstored_socket):
                    assert proc.poll() is None
                    await trio.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert log.exists()


async def test_killed_device_model_domain_can_still_be_destroyed(stack: Stack, xl: XlSim) -> None:
    created: dict[str, Any] = await xl("create", "--memory", "16")
    os.kill(created["dm_pid"], signal.SIGKILL)
    await xl("destroy", str(created["domid"]))
    assert (await xl("list"))["domains"] == []


async def test_create_after_a_hypervisor_restart_waits_for_the_new_device_model(
    stack: Stack, xl: XlSim
) -> None:
    """The domid is reused; the dead domain's device-model directory (still saying
    "running") must not pass for the new device model being ready."""
    old = await xl("create", "--memory", "16")
    hv = stack.daemons["hypervisor"]
    assert hv.process is not None
    hv.process.kill()
    await hv.process.wait()
    with trio.fail_after(30):
        while devicemodel.pid_alive(old["dm_pid"]):
            await trio.sleep(0.02)
    await start_daemon(hv, env=stack.env())
    new = await xl("create", "--memory", "16")
    assert new["domid"] == old["domid"]
    assert RunDir(stack.rundir).qmp_socket(new["domid"]).is_socket()
    await xl("pause", str(new["domid"]))
    assert [d["paused"] for d in (await xl("list"))["domains"]] == [True]


async def test_a_reused_domid_saves_the_new_domains_configuration(
    stack: Stack, xl: XlSim, tmp_path: Path
) -> None:
    """A domain that died with the hypervisor leaves its userdata; the next domain given its
    domid must not be saved (or listed) with the dead one's configuration."""
    old = await xl("create", "--memory", "16", "--vga", "stdvga")
    hv = stack.daemons["hypervisor"]
    assert hv.process is not None
    hv.process.kill()
    await hv.process.wait()
    with trio.fail_after(30):
        while devicemodel.pid_alive(old["dm_pid"]):
            await trio.sleep(0.02)
    await start_daemon(hv, env=stack.env())
    new = await xl("create", "--name", "new", "--memory", "16", "--vga", "cirrus")
    assert new["domid"] == old["domid"]
    assert [d["vga"] for d in (await xl("list"))["domains"]] == ["cirrus"]
    image = str(tmp_path / "new.img")
    await xl("save", str(new["domid"]), image)
    restored = await xl("restore", image)
    assert [(d["name"], d["vga"]) for d in (await xl("list"))["domains"]] == [("new", "cirrus")]
    await xl("destroy", str(restored["domid"]))


async def test_the_guest_reaches_xenstore_after_a_xenstored_restart(
    rundir: Path, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    async with open_stack(rundir, xenstored_args=state) as stack:
        xl = XlSim(stack)
        domid = str((await xl("create", "--name", "g", "--memory", "16"))["domid"])
        assert (await xl("guest", domid, "xs-read", "name"))["value"] == "g"
        xs = stack.daemons["xenstored"]
        assert xs.process is not None
        xs.process.kill()
        await xs.process.wait()
        await start_daemon(xs)
        assert (await xl("guest", domid, "xs-read", "name"))["value"] == "g"
        await xl("destroy", domid)


async def test_a_hypervisor_answers_only_after_removing_a_killed_ones_frames(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    RunDir(run).memory_dir.mkdir(parents=True)
    stale = RunDir(run).guest_memory(3)
    stale.write_bytes(b"\0" * 4096)
    with subprocess.Popen([str(BIN / "hypervisor-sim"), "--rundir", str(run)]) as proc:
        try:
            with trio.fail_after(30):
                while not _accepts(RunDir(run).hypervisor_socket):
                    assert proc.poll() is None
                    await trio.sleep(0.005)
            assert not stale.exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

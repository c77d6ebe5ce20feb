"""The device model killed in the middle of a save: the save fails clearly, writes no image,
and the domain is still there, paused, and can be resumed."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import trio

from physmap_lab.stack import Stack, stop_process
from toolstack import devicemodel


async def test_device_model_killed_during_save(stack: Stack, xl: Any, tmp_path: Path) -> None:
    created = await xl("create", "--memory", "16")
    d, pid = created["domid"], created["dm_pid"]
    await xl("guest", str(d), "xs-write", "data/before", "1")
    image = tmp_path / "dm-killed.img"
    # Stopped, the device model accepts the QMP connection but never answers: the save is
    # certainly under way (domain paused, QMP pending) when the device model dies.
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = await xl.start("save", str(d), str(image))
        try:
            assert await xl.wait_for_audit(stack.rundir, "save", "hypercall:domain_pause", proc)
            await trio.sleep(0.1)
        finally:
            os.kill(pid, signal.SIGKILL)
        with trio.fail_after(30):
            rc, out, err = await xl.communicate(proc)
    finally:
        with trio.CancelScope(shield=True):
            if "proc" in locals():
                await stop_process(proc)
    message = xl.clear_failure(rc, out, err)
    assert "device model" in message and "left paused" in message, message
    assert not image.exists() and not Path(f"{image}.tmp").exists()
    while devicemodel.pid_alive(pid):
        await trio.sleep(0.02)

    (info,) = (await xl("list"))["domains"]
    assert info["domid"] == d and info["paused"] is True
    await xl("unpause", str(d))
    (info,) = (await xl("list"))["domains"]
    assert info["paused"] is False
    # The guest runs again: its vCPU reaches xenstore and its memory.
    await xl("guest", str(d), "xs-write", "data/after", "2")
    assert (await xl("guest", str(d), "xs-read", "data/after"))["value"] == "2"
    await xl("destroy", str(d))

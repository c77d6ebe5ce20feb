"""xenstored restarted (SIGKILL, then started again on the same ``--state-dir``) at points during
a restore: the restore either completes, with the guest's framebuffer intact, or fails clearly
and leaves nothing half-created."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from physmap_lab.stack import Stack, open_stack, start_daemon, stop_process

#: Points in a restore, as the toolstack's audit log names them: the domain just built, guest
#: memory loaded, the device model started.
KILL_POINTS = ("hypercall:domain_create", "memory_restore", "xs_introduce", "dm_ready")


@pytest.fixture
async def stack(rundir: Path, tmp_path: Path) -> AsyncIterator[Stack]:
    state = tmp_path / "xenstored-state"
    async with open_stack(rundir, audit=True, xenstored_args=["--state-dir", str(state)]) as st:
        yield st


async def restart_xenstored(stack: Stack) -> None:
    daemon = stack.daemons["xenstored"]
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    await daemon.process.wait()
    await start_daemon(daemon)


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_restore_survives_a_xenstored_restart(
    stack: Stack, xl: Any, tmp_path: Path, point: str
) -> None:
    created = await xl("create", "--memory", "16")
    d = created["domid"]
    fb = await xl.draw(d, seed=7)
    image = tmp_path / "guest.img"
    await xl("save", str(d), str(image))

    proc = await xl.start("restore", str(image))
    try:
        reached = await xl.wait_for_audit(stack.rundir, "restore", point, proc)
        await restart_xenstored(stack)
        with trio.fail_after(60):
            rc, result, err = await xl.communicate(proc)
    finally:
        await stop_process(proc)
    assert reached or rc == 0, f"the restore ended before {point}: {result}"
    if rc == 0:
        r = result["domid"]
        (info,) = (await xl("list"))["domains"]
        assert info["domid"] == r and info["paused"] is False
        assert await xl.fb_hash(r) == fb
        assert await xl.exists(f"/local/domain/{r}/name")
        await xl("destroy", str(r))
    else:
        xl.clear_failure(rc, result, err)
        assert (await xl("list"))["domains"] == []
        await xl.nothing_of(d + 1)

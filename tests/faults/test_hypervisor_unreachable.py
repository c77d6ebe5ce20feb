"""The hypervisor unreachable, before a command and in the middle of a save or a restore: every
xl-sim command fails with a clear message, a non-zero exit and no traceback, and no image is
left under its final name."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from physmap_lab.stack import Stack, stop_daemon, stop_process
from toolstack.image import read_image


async def kill_hypervisor(stack: Stack) -> None:
    daemon = stack.daemons["hypervisor"]
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    await daemon.process.wait()


async def test_commands_without_a_hypervisor_fail_clearly(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    created = await xl("create", "--memory", "16")
    image = tmp_path / "guest.img"
    await xl("save", "--checkpoint", str(created["domid"]), str(image))
    await stop_daemon(stack.daemons["hypervisor"])
    for args in (
        ("list",),
        ("create", "--memory", "16"),
        ("pause", "1"),
        ("unpause", "1"),
        ("destroy", "1"),
        ("save", "1", str(tmp_path / "again.img")),
        ("restore", str(image)),
        ("guest", "1", "fb-hash"),
    ):
        rc, out, err = await xl.run(*args)
        message = xl.clear_failure(rc, out, err)
        assert "cannot reach hypervisor-sim" in message, (args, message)
    assert not (tmp_path / "again.img").exists()
    assert not (tmp_path / "again.img.tmp").exists()


async def run_until(
    xl: Any, stack: Stack, point: str, *args: str
) -> tuple[int, dict[str, Any], str]:
    """Run ``xl-sim ARGS``, kill the hypervisor when the audit log reaches ``point``."""
    proc = await xl.start(*args)
    try:
        reached = await xl.wait_for_audit(stack.rundir, args[0], point, proc)
        assert reached, f"xl-sim {args[0]} ended before {point}"
        await kill_hypervisor(stack)
        with trio.fail_after(60):
            return await xl.communicate(proc)  # type: ignore[no-any-return]
    finally:
        await stop_process(proc)


@pytest.mark.parametrize("point", ["qmp:stop", "hypercall:p2m"])
async def test_hypervisor_dies_during_save(
    stack: Stack, xl: Any, tmp_path: Path, point: str
) -> None:
    created = await xl("create", "--memory", "16")
    d = created["domid"]
    image = tmp_path / "guest.img"
    rc, out, err = await run_until(xl, stack, point, "save", str(d), str(image))
    message = xl.clear_failure(rc, out, err)
    assert "hypervisor" in message, message
    # Never a partial image under the final name: either none, or (when the hypervisor died
    # after the guest's frames were mapped, so that only the destroy failed) a complete one.
    assert not Path(f"{image}.tmp").exists()
    if image.exists():
        with image.open("rb") as f:
            read_image(f)


@pytest.mark.parametrize("point", ["hypercall:populate_physmap", "memory_restore", "spawn"])
async def test_hypervisor_dies_during_restore(
    stack: Stack, xl: Any, tmp_path: Path, point: str
) -> None:
    created = await xl("create", "--memory", "16")
    d = created["domid"]
    image = tmp_path / "guest.img"
    await xl("save", str(d), str(image))
    rc, out, err = await run_until(xl, stack, point, "restore", str(image))
    xl.clear_failure(rc, out, err)
    # The hypervisor's domains died with it; the toolstack removed its own traces.
    await xl.nothing_of(d + 1, hypervisor_alive=False)

"""xl-sim against the real daemons and the real device model, each a separate process."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from physmap_lab.stack import Stack
from toolstack import devicemodel
from toolstack.image import read_image
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

MEM = "16"


async def xs_read(stack: Stack, path: str) -> str | None:
    async with open_xenstore(stack.xenstored_socket) as xs:
        try:
            return (await xs.read(path)).decode()
        except XsError as exc:
            assert exc.errno_name == "ENOENT"
            return None


async def xs_perms(stack: Stack, path: str) -> list[str]:
    async with open_xenstore(stack.xenstored_socket) as xs:
        return await xs.get_perms(path)


def audit(rundir: Path) -> list[dict[str, Any]]:
    path = rundir / "audit" / "toolstack.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def assert_gone(stack: Stack, domid: int, dm_pid: int | None) -> None:
    run = stack.rundir
    if dm_pid is not None:
        assert not devicemodel.pid_alive(dm_pid), "device model still running"
    assert not (run / "qmp" / f"{domid}.sock").exists()
    assert not (run / "mem" / f"dom{domid}.mem").exists()
    assert not (run / "domains" / f"{domid}.sock").exists()
    assert not list(run.glob(f"lib/userdata-d.{domid}.*"))
    assert not list(run.glob(f"lib/qemu-*.{domid}"))
    assert await xs_read(stack, f"/local/domain/{domid}") is None
    assert await xs_read(stack, f"/local/domain/0/device-model/{domid}") is None
    assert await xs_read(stack, f"/libxl/{domid}") is None


async def draw(xl: Any, domid: int, seed: int) -> str:
    mode = ["--width", "320", "--height", "200", "--bpp", "32"]
    await xl("guest", str(domid), "map-bar")
    await xl("guest", str(domid), "set-mode", *mode)
    await xl("guest", str(domid), "draw", "--seed", str(seed), *mode)
    return str((await xl("guest", str(domid), "fb-hash", *mode))["sha256"])


async def test_create_list_destroy_leaves_nothing_behind(stack: Stack, xl: Any) -> None:
    created = await xl("create", "--name", "vm1", "--memory", MEM)
    domid, pid = created["domid"], created["dm_pid"]
    assert devicemodel.is_device_model(pid, domid)
    listed = (await xl("list"))["domains"]
    assert [(d["domid"], d["name"], d["paused"], d["dm_pid"]) for d in listed] == [
        (domid, "vm1", False, pid)
    ]
    assert await xs_read(stack, f"/local/domain/{domid}/image/device-model-pid") == str(pid)
    assert await xs_read(stack, f"/local/domain/0/device-model/{domid}/state") == "running"
    await xl("destroy", str(domid))
    await assert_gone(stack, domid, pid)
    assert (await xl("list"))["domains"] == []
    rc, out, _ = await xl.run("destroy", str(domid))
    assert rc == 1 and "does not exist" in out["error"]


async def test_create_writes_the_libxl_tree_with_its_permissions(stack: Stack, xl: Any) -> None:
    created = await xl("create", "--name", "perm", "--memory", MEM, "--vga", "cirrus")
    d = created["domid"]
    dom = f"/local/domain/{d}"
    assert await xs_perms(stack, dom) == ["n0", f"r{d}"]
    assert await xs_perms(stack, f"{dom}/control/shutdown") == [f"n{d}"]
    assert await xs_perms(stack, f"{dom}/data") == [f"n{d}"]
    assert await xs_perms(stack, f"/libxl/{d}") == ["n0"]
    vm = await xs_read(stack, f"{dom}/vm")
    assert vm == f"/vm/{created['uuid']}"
    assert await xs_perms(stack, vm) == ["n0", f"r{d}"]
    assert await xs_read(stack, f"{vm}/name") == "perm"
    assert await xs_read(stack, f"{dom}/name") == "perm"
    assert await xs_read(stack, f"{dom}/domid") == str(d)
    assert await xs_read(stack, f"{dom}/memory/target") == str(16 * 1024)
    assert await xs_read(stack, f"{dom}/memory/videoram") == str(8 * 1024)
    assert (await xs_perms(stack, f"/local/domain/0/device-model/{d}"))[0] == "n0"
    # INTRODUCE gave the guest its socket; the guest reads its own tree through it.
    got = await xl("guest", str(d), "xs-read", f"{dom}/name")
    assert got["value"] == "perm"
    rc, out, _ = await xl.run("create", "--name", "perm", "--memory", MEM)
    assert rc == 1 and "already exists" in out["error"]
    await xl("destroy", str(d))


async def test_a_device_model_that_dies_is_rolled_back(stack: Stack, xl: Any) -> None:
    # From QEMU 3.0 a compat build cannot restrict itself: QEMU exits with "xen: failed to
    # restrict" (R6).  QEMU 2.10 counts the stubs' ENOTTY as success and starts.
    rc, out, _err = await xl.run(
        "create", "--name", "r6", "--memory", MEM, "--dm-mode", "compat", "--dm-restrict",
        "--dm-qemu-version", "3.0",
    )  # fmt: skip
    assert rc == 1
    assert "exited during start-up" in out["error"] and "failed to restrict" in out["error"]
    assert (await xl("list"))["domains"] == []
    await assert_gone(stack, 1, None)
    assert any(a["action"] == "rollback" for a in audit(stack.rundir))


async def _save_restore(
    stack: Stack, xl: Any, tmp_path: Path, mode: str, *extra: str
) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    created = await xl("create", "--name", f"sr-{mode}", "--memory", MEM, "--dm-mode", mode, *extra)
    d = created["domid"]
    before = await draw(xl, d, seed=7)
    image = tmp_path / f"{mode}.img"
    saved = await xl("save", str(d), str(image))
    assert saved["records"][-1] == "END" and saved["bytes"] == image.stat().st_size
    assert not Path(str(image) + ".tmp").exists()
    await assert_gone(stack, d, created["dm_pid"])
    restored = await xl("restore", str(image))
    assert restored["records"] == saved["records"]
    after = str(
        (
            await xl(
                "guest",
                str(restored["domid"]),
                "fb-hash",
                "--width",
                "320",
                "--height",
                "200",
                "--bpp",
                "32",
            )
        )["sha256"]
    )
    await xl("destroy", str(restored["domid"]))
    await assert_gone(stack, restored["domid"], restored["dm_pid"])
    return saved, restored, before, after


async def test_compat_save_restore_carries_and_plants_the_physmap_keys(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    saved, restored, before, after = await _save_restore(stack, xl, tmp_path, "compat")
    assert saved["records"] == [
        "LIBXC_CONTEXT",
        "EMULATOR_XENSTORE_DATA",
        "EMULATOR_CONTEXT",
        "END",
    ]
    keys = saved["xenstore_keys"]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["name", "size", "start_addr"]
    assert keys[next(k for k in keys if k.endswith("start_addr"))] == "f0000000"
    assert restored["xenstore_keys"] == keys
    assert after == before
    # K5/§2.4: the keys are written before the device model is spawned.
    steps = [a for a in audit(stack.rundir) if a["command"] == "restore"]
    writes = [i for i, a in enumerate(steps) if "/physmap/" in a.get("path", "")]
    spawn = next(i for i, a in enumerate(steps) if a["action"] == "spawn")
    assert writes and max(writes) < spawn


async def test_new_mode_image_has_no_xenstore_record(stack: Stack, xl: Any, tmp_path: Path) -> None:
    saved, restored, before, after = await _save_restore(stack, xl, tmp_path, "new")
    assert saved["records"] == ["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"]
    assert saved["xenstore_keys"] == {} and restored["xenstore_keys"] == {}
    assert after == before


async def test_unaware_toolstack_drops_the_keys(stack: Stack, xl: Any, tmp_path: Path) -> None:
    created = await xl("create", "--memory", MEM, "--dm-mode", "compat", "--toolstack", "unaware")
    d = created["domid"]
    await draw(xl, d, seed=3)
    image = tmp_path / "unaware.img"
    saved = await xl("save", str(d), str(image))
    assert "EMULATOR_XENSTORE_DATA" not in saved["records"]
    with image.open("rb") as f:
        assert read_image(f).xenstore is None


async def test_checkpoint_keeps_the_domain_running(stack: Stack, xl: Any, tmp_path: Path) -> None:
    created = await xl("create", "--memory", MEM)
    d = created["domid"]
    saved = await xl("save", "--checkpoint", str(d), str(tmp_path / "cp.img"))
    assert saved["checkpoint"] is True
    (info,) = (await xl("list"))["domains"]
    assert info["domid"] == d and info["paused"] is False
    assert devicemodel.pid_alive(created["dm_pid"])
    await xl("destroy", str(d))


async def test_save_with_a_dead_device_model_leaves_the_domain_paused(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    created = await xl("create", "--memory", MEM)
    d, pid = created["domid"], created["dm_pid"]
    os.kill(pid, signal.SIGKILL)
    while devicemodel.pid_alive(pid):
        await trio.sleep(0.02)
    image = tmp_path / "dead.img"
    rc, out, _ = await xl.run("save", str(d), str(image))
    assert rc == 1 and "left paused" in out["error"]
    assert not image.exists() and not Path(str(image) + ".tmp").exists()
    (info,) = (await xl("list"))["domains"]
    assert info["domid"] == d and info["paused"] is True
    await xl("destroy", str(d))
    await assert_gone(stack, d, pid)


async def test_bad_images_leave_no_domain_behind(stack: Stack, xl: Any, tmp_path: Path) -> None:
    created = await xl("create", "--memory", MEM)
    image = tmp_path / "good.img"
    await xl("save", str(created["domid"]), str(image))
    data = image.read_bytes()

    truncated = tmp_path / "truncated.img"
    truncated.write_bytes(data[: len(data) // 2])
    rc, out, _ = await xl.run("restore", str(truncated))
    assert rc == 1 and "truncated" in out["error"]
    assert (await xl("list"))["domains"] == []

    # A valid stream whose device state the device model cannot load: the domain is built,
    # the device model dies on --incoming, and everything is rolled back.
    with image.open("rb") as f:
        index = read_image(f)
    assert index.emulator_context is not None
    offset, length = index.emulator_context
    garbage = bytearray(data)
    garbage[offset : offset + length] = b"\xc1" * length
    corrupt = tmp_path / "corrupt.img"
    corrupt.write_bytes(bytes(garbage))
    rc, out, _ = await xl.run("restore", str(corrupt))
    assert rc == 1 and "device model" in out["error"]
    assert (await xl("list"))["domains"] == []
    domid = created["domid"] + 1
    await assert_gone(stack, domid, None)
    assert not (stack.rundir / "lib" / f"qemu-resume.{domid}").exists()


async def test_libxl_save_stops_at_the_first_missing_physmap_key(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    """libxl__save_emulator_xenstore_data (libxl_dom_save.c) reads the subkeys in order and
    fails at the first missing one: ``name`` is never read.  The device model runs in dom0,
    so image/device-model-domid is not written (only libxl__spawn_stub_dm writes it)."""
    created = await xl("create", "--name", "k3", "--memory", MEM, "--dm-mode", "compat")
    d = created["domid"]
    await xl("guest", str(d), "map-bar")
    root = f"/local/domain/0/device-model/{d}/physmap"
    async with open_xenstore(stack.xenstored_socket) as xs:
        [entry] = await xs.directory(root)
        await xs.rm(f"{root}/{entry}/size")
        with pytest.raises(XsError):
            await xs.read(f"/local/domain/{d}/image/device-model-domid")
    rc, out, _ = await xl.run("save", str(d), str(tmp_path / "k3.img"))
    assert rc == 1 and "has no 'size' key" in out["error"]
    reads = [a["path"] for a in audit(stack.rundir) if a["action"] == "xs_read"]
    assert f"{root}/{entry}/start_addr" in reads and f"{root}/{entry}/size" in reads
    assert f"{root}/{entry}/name" not in reads
    await xl("destroy", str(d))

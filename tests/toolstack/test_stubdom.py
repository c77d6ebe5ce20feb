"""``xl-sim --dm-stubdom``: the device model as an unprivileged stub domain, against the real
daemons and the real device model (docs/qemu-physmap.md, 'Stub domains', docs/xenstore.md,
'SET_TARGET and stub domains')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from physmap_lab.stack import Stack
from toolstack import devicemodel
from xenhost import RunDir
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

MEM = "16"
MODE = ["--width", "320", "--height", "200", "--bpp", "32"]


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


def xenstored_audit(rundir: Path) -> list[dict[str, Any]]:
    path = RunDir(rundir).audit_log("xenstored")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dm_requests(rundir: Path, dm_pid: int) -> list[dict[str, Any]]:
    return [
        r
        for r in xenstored_audit(rundir)
        if r.get("pid") == dm_pid and r.get("op") not in ("connect", "disconnect")
    ]


async def draw(xl: Any, domid: int, seed: int) -> str:
    await xl("guest", str(domid), "map-bar")
    await xl("guest", str(domid), "set-mode", *MODE)
    await xl("guest", str(domid), "draw", "--seed", str(seed), *MODE)
    return str((await xl("guest", str(domid), "fb-hash", *MODE))["sha256"])


async def assert_stub_gone(stack: Stack, stub: int) -> None:
    run = stack.rundir
    assert not RunDir(run).guest_socket(stub).exists()
    assert not RunDir(run).guest_memory(stub).exists()
    assert await xs_read(stack, f"/local/domain/{stub}") is None


async def test_new_mode_stubdom_create_save_restore_destroy(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    created = await xl("create", "--name", "s1", "--memory", MEM, "--dm-stubdom")
    domid, pid = created["domid"], created["dm_pid"]
    stub = int(await xs_read(stack, f"/local/domain/{domid}/image/device-model-domid") or 0)
    assert stub not in (0, domid)
    assert RunDir(stack.rundir).guest_socket(stub).exists()
    listed = {d["domid"]: d["name"] for d in (await xl("list"))["domains"]}
    assert listed == {domid: "s1", stub: "s1-dm"}
    # libxl's directory for a stub device model: owned by the stub, readable by the guest.
    assert await xs_perms(stack, f"/local/domain/{stub}/device-model/{domid}") == [
        f"n{stub}",
        f"r{domid}",
    ]
    # No grant: the device model wrote its readiness node relative to its home, into the
    # stub's own tree (docs/qemu-physmap.md, 'Start-up and readiness', 'Stub domains'); dom0's tree
    # holds nothing of it.
    state = f"/local/domain/{stub}/device-model/{domid}/state"
    assert (await xs_perms(stack, state))[0] == f"n{stub}"
    assert await xs_read(stack, state) == "running"
    assert await xs_read(stack, f"/local/domain/0/device-model/{domid}/state") is None
    assert await xs_perms(stack, f"/local/domain/0/device-model/{domid}") == ["n0"]
    seen = dm_requests(stack.rundir, pid)
    assert seen and all(r["domid"] == stub and not r["priv"] for r in seen)
    assert {r["op"] for r in seen} == {"WRITE"}
    assert all(r["result"] == "OK" for r in seen)
    assert {r["path"] for r in seen} == {state}

    drawn = await draw(xl, domid, 7)
    image = tmp_path / "s1.img"
    saved = await xl("save", str(domid), str(image))
    assert saved["records"] == ["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"]
    await assert_stub_gone(stack, stub)

    restored = await xl("restore", str(image))
    new, new_pid = restored["domid"], restored["dm_pid"]
    new_stub = int(await xs_read(stack, f"/local/domain/{new}/image/device-model-domid") or 0)
    assert new_stub not in (0, new)
    assert (await xl("guest", str(new), "fb-hash", *MODE))["sha256"] == drawn
    seen = dm_requests(stack.rundir, new_pid)
    assert seen and all(r["domid"] == new_stub and r["result"] == "OK" for r in seen)
    new_state = f"/local/domain/{new_stub}/device-model/{new}/state"
    assert await xs_read(stack, new_state) == "running"

    await xl("destroy", str(new))
    assert not devicemodel.pid_alive(new_pid)
    await assert_stub_gone(stack, new_stub)
    assert (await xl("list"))["domains"] == []
    for d in (domid, new):
        assert await xs_read(stack, f"/local/domain/0/device-model/{d}") is None
        assert await xs_read(stack, f"/local/domain/{d}") is None
    assert sorted(p.name for p in RunDir(stack.rundir).domains_dir.iterdir()) == []


async def test_a_custom_grant_is_given_to_the_stub_alone_and_goes_with_it(
    stack: Stack, xl: Any
) -> None:
    rc, out, _ = await xl.run(
        "create",
        "--name",
        "s2",
        "--memory",
        MEM,
        "--dm-stubdom",
        "--dm-restrict",
        "--dm-grant",
        "r /local/domain/0/device-model/$DOMID/physmap",
    )
    # With dm_restrict readiness comes over QMP; the grant names a node that is made for it.
    assert rc == 0, out
    domid = out["domid"]
    stub = int(await xs_read(stack, f"/local/domain/{domid}/image/device-model-domid") or 0)
    physmap = f"/local/domain/0/device-model/{domid}/physmap"
    assert await xs_perms(stack, physmap) == ["n0", f"r{stub}"]
    assert await xs_perms(stack, f"/local/domain/0/device-model/{domid}") == ["n0"]
    await xl("destroy", str(domid))
    await assert_stub_gone(stack, stub)
    assert (await xl("list"))["domains"] == []


async def test_bad_grants_are_refused_before_anything_is_made(stack: Stack, xl: Any) -> None:
    rc, out, _ = await xl.run("create", "--dm-stubdom", "--dm-grant", "x /local/domain")
    assert rc == 1 and "access must be r, w or b" in out["error"]
    rc, out, _ = await xl.run("create", "--dm-stubdom", "--dm-grant", "r local/domain")
    assert rc == 1 and "absolute" in out["error"]
    assert (await xl("list"))["domains"] == []

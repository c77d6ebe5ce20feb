"""qemu-model as a real process against real hypervisor-sim and xenstored-sim.

Each test plays the toolstack by hand: create a domain, start the device model, let the guest
map the BAR and draw through hypervisor-sim's guest driver, save the device state over QMP,
copy the guest's memory into a fresh domain, and restore with ``--incoming``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from hypervisor_sim import guest_drivers
from hypervisor_sim.client import HypervisorClient, open_hypervisor
from physmap_lab.stack import Stack, executable, open_stack, stop_process
from xenstored_sim.client import XsClient, XsError, open_xenstore

MEMORY_MIB = 4
VRAM_MIB = 4
BAR = 0xF0000000
MODE = {"width": 320, "height": 200, "bpp": 32, "addr": BAR, "vram_mib": VRAM_MIB}
SEED = 7
MAX_PAGES = (MEMORY_MIB + VRAM_MIB) * 256 + 16


def pattern_sha256(device: str) -> str:
    _, length = guest_drivers.framebuffer(device, BAR, 320, 200, 32)
    return hashlib.sha256(guest_drivers.pattern_bytes(SEED, length)).hexdigest()


class Qmp:
    """A minimal QMP client: one command at a time, events kept aside."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    async def line(self) -> dict[str, Any]:
        while (nl := self.buf.find(b"\n")) < 0:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("QMP closed")
            self.buf += data
        line = bytes(self.buf[:nl])
        del self.buf[: nl + 1]
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def send_raw(self, data: bytes) -> dict[str, Any]:
        await self.stream.send_all(data)
        while True:
            msg = await self.line()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def execute(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        reply = await self.send_raw(json.dumps(msg).encode() + b"\n")
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]


@asynccontextmanager
async def open_qmp(path: Path, *, negotiate: bool = True) -> AsyncIterator[Qmp]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        q = Qmp(stream)
        q.greeting = await q.line()
        if negotiate:
            await q.execute("qmp_capabilities")
        yield q


@dataclass
class DeviceModel:
    process: trio.Process
    log: Path
    qmp_path: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Lab:
    stack: Stack
    hv: HypervisorClient
    xs: XsClient
    tmp: Path
    dms: list[DeviceModel] = field(default_factory=list)

    async def domain(self, name: str, *, populate: bool = True) -> int:
        domid = await self.hv.domain_create(name, max_pages=MAX_PAGES)
        if populate:  # main RAM of a fresh boot is the toolstack's to populate
            await self.hv.populate_physmap(domid, range(MEMORY_MIB * 256))
        await self.xs.mkdir(f"/local/domain/0/device-model/{domid}")
        return domid

    async def start_dm(self, domid: int, *args: str, wait: bool = True) -> DeviceModel:
        log = self.tmp / f"dm-{domid}-{len(self.dms)}.log"
        argv = [
            executable("qemu-model"),
            "--domid", str(domid),
            "--rundir", str(self.stack.rundir),
            "--memory-mib", str(MEMORY_MIB),
            "--vram-mib", str(VRAM_MIB),
            *args,
        ]  # fmt: skip
        with open(log, "wb") as f:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=self.stack.env()
            )
        dm = DeviceModel(proc, log, self.stack.rundir / "qmp" / f"{domid}.sock")
        self.dms.append(dm)
        if wait:
            with trio.fail_after(15):
                while not dm.qmp_path.exists():
                    if proc.poll() is not None:
                        raise RuntimeError(f"qemu-model exited {proc.returncode}:\n{dm.output()}")
                    await trio.sleep(0.02)
        return dm

    async def copy_memory(self, src: int, dst: int) -> None:
        """The toolstack's job on restore: the same gfns with the same bytes."""
        runs = await self.hv.p2m(src)
        for first, count in runs:
            gfns = list(range(first, first + count))
            await self.hv.populate_physmap(dst, gfns)
            s = await self.hv.map_foreign(src, gfns)
            d = await self.hv.map_foreign(dst, gfns)
            sfd = os.open(s["mem_path"], os.O_RDONLY)
            dfd = os.open(d["mem_path"], os.O_RDWR)
            try:
                for so, do in zip(s["offsets"], d["offsets"], strict=True):
                    os.pwrite(dfd, os.pread(sfd, 4096, so), do)
            finally:
                os.close(sfd)
                os.close(dfd)

    async def boot_and_draw(self, mode: str, device: str) -> tuple[int, DeviceModel]:
        src = await self.domain("src")
        dm = await self.start_dm(src, "--xen-mode", mode, "--vga", device)
        await self.hv.domain_unpause(src)
        for action in ("map_bar", "set_mode", "draw"):
            await self.hv.guest_driver(src, device, action, {**MODE, "seed": SEED})
        return src, dm

    async def save(self, src: int, dm: DeviceModel) -> Path:
        image = self.tmp / f"qemu-save.{src}"
        await self.hv.domain_pause(src)
        async with open_qmp(dm.qmp_path) as q:
            await q.execute("stop")
            assert await q.execute("xen-save-devices-state", filename=str(image)) == {}
        return image


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    rundir = tmp_path / "run"
    async with (
        open_stack(rundir) as stack,
        open_hypervisor(stack.hypervisor_socket) as hv,
        open_xenstore(stack.xenstored_socket) as xs,
    ):
        lab = Lab(stack, hv, xs, tmp_path)
        try:
            yield lab
        finally:
            for dm in lab.dms:
                await stop_process(dm.process)
    assert not (rundir / "qmp").exists() or list((rundir / "qmp").iterdir()) == []


async def wait_exit(dm: DeviceModel) -> int:
    with trio.fail_after(15):
        return await dm.process.wait()


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, device",
    [("new", "stdvga"), ("new", "cirrus"), ("new", "qxl"), ("pointer-fixup", "stdvga")],
)
async def test_restore_keeps_the_framebuffer(lab: Lab, mode: str, device: str) -> None:
    src, dm = await lab.boot_and_draw(mode, device)
    want = pattern_sha256(device)
    async with open_qmp(dm.qmp_path) as q:
        info = await q.execute("x-physmap-info")
        assert info["display_sha256"] == want
        assert info["physmap"][0]["start_addr"] == BAR
    image = await lab.save(src, dm)
    dst = await lab.domain("dst", populate=False)
    await lab.copy_memory(src, dst)
    await lab.hv.domain_destroy(src)
    dm2 = await lab.start_dm(dst, "--xen-mode", mode, "--vga", device, "--incoming", str(image))
    async with open_qmp(dm2.qmp_path) as q:
        with trio.fail_after(10):
            while (status := await q.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.02)
        assert status == {"status": "running", "running": True, "singlestep": False}
        info = await q.execute("x-physmap-info")
    assert info["mode"] == mode and info["device"] == device
    assert info["display_sha256"] == want
    assert info["derived_ptrs_valid"]
    assert len(info["physmap"]) == 1 and info["physmap"][0]["start_addr"] == BAR
    assert info["xenstore_physmap_ops"] == 0
    if mode == "new":
        assert info["vram_ptr"] == info["vram_ptr_at_init"]
        assert info["mapcache"]["replacements"] == 1
    else:
        assert info["vram_ptr"] != info["vram_ptr_at_init"]
    # The guest sees its framebuffer too.
    await lab.hv.domain_unpause(dst)
    assert await lab.hv.guest_driver(dst, device, "sha256", MODE) == [want]
    assert await lab.xs.read(f"/local/domain/0/device-model/{dst}/state") == b"running"
    async with open_qmp(dm2.qmp_path) as q:
        assert await q.execute("quit") == {}
    assert await wait_exit(dm2) == 0


async def test_qxl_pointer_fixup_breaks_derived_pointers(lab: Lab) -> None:
    src, dm = await lab.boot_and_draw("pointer-fixup", "qxl")
    image = await lab.save(src, dm)
    dst = await lab.domain("dst", populate=False)
    await lab.copy_memory(src, dst)
    dm2 = await lab.start_dm(dst, "--xen-mode", "pointer-fixup", "--vga", "qxl", "--incoming",
                             str(image), "-S")  # fmt: skip
    async with open_qmp(dm2.qmp_path) as q:
        with trio.fail_after(10):
            while (await q.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.02)
        assert (await q.execute("query-status"))["status"] == "paused"
        info = await q.execute("x-physmap-info")
    # The reconstruction updates block->host and vram_ptr in xen_add_to_physmap; d->ram, set by
    # init_qxl_ram at realize, still points into the dummy.
    assert not info["derived_ptrs_valid"]
    assert info["vram_ptr"] != info["vram_ptr_at_init"]
    ram = info["derived_ptrs"]["ram"]
    assert (
        ram["ptr"] != ram["expected"]
        and ram["expected"] == info["vram_ptr"] + (VRAM_MIB << 20) - 8192
    )


async def test_compat_mode_writes_and_reads_exactly_the_physmap_keys(lab: Lab) -> None:
    src, dm = await lab.boot_and_draw("compat", "stdvga")
    base = f"/local/domain/0/device-model/{src}/physmap"
    assert await lab.xs.directory(base) == [f"{MEMORY_MIB << 20:x}"]
    entry = f"{base}/{MEMORY_MIB << 20:x}"
    assert sorted(await lab.xs.directory(entry)) == ["name", "size", "start_addr"]
    assert await lab.xs.read(f"{entry}/start_addr") == b"f0000000"
    assert await lab.xs.read(f"{entry}/size") == f"{VRAM_MIB << 20:x}".encode()
    assert await lab.xs.read(f"{entry}/name") == b"vga.vram"
    image = await lab.save(src, dm)
    dst = await lab.domain("dst", populate=False)
    await lab.copy_memory(src, dst)
    # libxl's EMULATOR_XENSTORE_DATA restore: the keys land before the device model starts.
    for key in ("start_addr", "size", "name"):
        value = await lab.xs.read(f"{entry}/{key}")
        await lab.xs.write(f"/local/domain/0/device-model/{dst}/physmap/{MEMORY_MIB << 20:x}/{key}",
                           value)  # fmt: skip
    dm2 = await lab.start_dm(dst, "--xen-mode", "compat", "--vga", "stdvga", "--incoming",
                             str(image))  # fmt: skip
    async with open_qmp(dm2.qmp_path) as q:
        with trio.fail_after(10):
            while (await q.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.02)
        info = await q.execute("x-physmap-info")
    dbase = f"/local/domain/0/device-model/{dst}/physmap"
    dentry = f"{dbase}/{MEMORY_MIB << 20:x}"
    assert [(o["op"], o["path"]) for o in info["xenstore_physmap_log"]] == [
        ("directory", dbase),
        ("read", f"{dentry}/start_addr"),
        ("read", f"{dentry}/size"),
        ("read", f"{dentry}/name"),
    ]
    assert info["mapcache"]["replacements"] == 0 and info["mapcache"]["dummy_mappings"] == 0
    assert info["vram_ptr"] == info["vram_ptr_at_init"]
    assert info["display_sha256"] == pattern_sha256("stdvga")


async def test_compat_restore_without_keys_aborts(lab: Lab) -> None:
    src, dm = await lab.boot_and_draw("compat", "stdvga")
    image = await lab.save(src, dm)
    dst = await lab.domain("dst", populate=False)
    await lab.copy_memory(src, dst)
    dm2 = await lab.start_dm(dst, "--xen-mode", "compat", "--incoming", str(image), wait=False)
    assert await wait_exit(dm2) == -signal.SIGABRT
    assert "addr == NULL && flags == 0" in dm2.output()
    assert not dm2.qmp_path.exists()


@pytest.mark.parametrize("version", ["2.10", "3.0"])
async def test_restrict_new_mode_restores_without_xenstore(lab: Lab, version: str) -> None:
    src, dm = await lab.boot_and_draw("new", "qxl")
    image = await lab.save(src, dm)
    dst = await lab.domain("dst", populate=False)
    await lab.copy_memory(src, dst)
    dm2 = await lab.start_dm(dst, "--vga", "qxl", "--restrict", "-S", "--incoming", str(image),
                             "--qemu-version", version)  # fmt: skip
    async with open_qmp(dm2.qmp_path) as q:
        with trio.fail_after(10):
            while (await q.execute("query-status"))["status"] == "inmigrate":
                await trio.sleep(0.02)
        assert await q.execute("cont") == {}
        assert (await q.execute("query-status"))["running"]
        assert [e["event"] for e in q.events] == ["RESUME"]
        info = await q.execute("x-physmap-info")
    assert info["restricted"] and info["derived_ptrs_valid"]
    assert info["display_sha256"] == pattern_sha256("qxl")
    state = f"/local/domain/0/device-model/{dst}/state"
    if version == "2.10":
        # xen_restrict restricts devicemodel and foreignmemory only: xenstore stays open and
        # xenstore_record_dm_state writes "running".
        assert info["restricted_handles"] == ["devicemodel", "foreignmemory"]
        assert await lab.xs.read(state) == b"running"
    else:
        # xentoolcore_restrict_all; the state handler is not registered (libxl uses QMP).
        assert "xenstore" in info["restricted_handles"]
        with pytest.raises(XsError):
            await lab.xs.read(state)


async def test_restrict_with_compat_fails_like_qemu_3_0(lab: Lab) -> None:
    """xen_setup_post: the compat xentoolcore_restrict_all stub fails with ENOTTY."""
    domid = await lab.domain("guest")
    dm = await lab.start_dm(domid, "--xen-mode", "compat", "--restrict", "--qemu-version", "3.0",
                            wait=False)  # fmt: skip
    assert await wait_exit(dm) == 1
    assert "xen: failed to restrict" in dm.output()


async def test_restrict_with_compat_starts_in_qemu_2_10(lab: Lab) -> None:
    """QEMU 2.10 xen_restrict counts the stubs' ENOTTY as success: the compat device model
    starts unrestricted and records its state."""
    domid = await lab.domain("guest")
    dm = await lab.start_dm(domid, "--xen-mode", "compat", "--restrict")
    try:
        async with open_qmp(dm.qmp_path) as q:
            info = await q.execute("x-physmap-info")
        assert info["restricted_handles"] == [] and info["qemu_version"] == "2.10"
        with trio.fail_after(10):
            while True:
                try:
                    state = await lab.xs.read(f"/local/domain/0/device-model/{domid}/state")
                    break
                except XsError:
                    await trio.sleep(0.02)
        assert state == b"running"
    finally:
        await stop_process(dm.process)


async def test_auto_picks_compat_for_old_libraries(tmp_path: Path) -> None:
    async with (
        open_stack(tmp_path / "run", hypervisor_args=["--xen-libs", "4.9"]) as stack,
        open_hypervisor(stack.hypervisor_socket) as hv,
    ):
        lab = Lab(stack, hv, None, tmp_path)  # type: ignore[arg-type]
        domid = await hv.domain_create("guest", max_pages=MAX_PAGES)
        dm = await lab.start_dm(domid, "--xen-mode", "auto")
        try:
            async with open_qmp(dm.qmp_path) as q:
                info = await q.execute("x-physmap-info")
            assert info["mode"] == "compat" and info["requested_mode"] == "auto"
        finally:
            await stop_process(dm.process)
        assert dm.process.returncode == 0


async def test_qmp_protocol_errors_never_crash(lab: Lab) -> None:
    domid = await lab.domain("guest")
    dm = await lab.start_dm(domid)
    async with open_qmp(dm.qmp_path, negotiate=False) as q:
        assert q.greeting["QMP"]["capabilities"] == []
        assert "qemu" in q.greeting["QMP"]["version"]
        early = await q.send_raw(b'{"execute": "query-status"}\n')
        assert early["error"]["class"] == "CommandNotFound"
        assert (await q.send_raw(b"{not json\n"))["error"]["class"] == "GenericError"
        assert await q.execute("qmp_capabilities") == {}
        bad = await q.send_raw(b'{"execute": "no-such-command", "id": 3}\n')
        assert bad == {
            "error": {
                "class": "CommandNotFound",
                "desc": "The command no-such-command has not been found",
            },
            "id": 3,
        }
        assert "error" in await q.send_raw(b"[1, 2]\n")
        missing = await q.send_raw(b'{"execute": "xen-save-devices-state"}\n')
        assert missing["error"]["desc"] == "Parameter 'filename' is missing"
        corrupt = lab.tmp / "corrupt"
        corrupt.write_bytes(b"\x00garbage")
        await q.execute("stop")
        reply = await q.send_raw(
            json.dumps({"execute": "xen-load-devices-state",
                        "arguments": {"filename": str(corrupt)}}).encode() + b"\n"
        )  # fmt: skip
        assert "load of device state failed" in reply["error"]["desc"]
        unwritable = await q.send_raw(
            json.dumps({"execute": "xen-save-devices-state",
                        "arguments": {"filename": "/nonexistent/dir/f"}}).encode() + b"\n"
        )  # fmt: skip
        assert unwritable["error"]["class"] == "GenericError"
        assert (await q.execute("query-status"))["status"] == "paused"
        assert [e["event"] for e in q.events] == ["STOP"]
    assert dm.process.poll() is None


async def test_corrupt_incoming_file_exits_with_a_message(lab: Lab) -> None:
    domid = await lab.domain("guest")
    bad = lab.tmp / "bad-image"
    bad.write_bytes(b"\x82\xa5magic\xa3bad\xa7version\x01")
    dm = await lab.start_dm(domid, "--incoming", str(bad), wait=False)
    assert await wait_exit(dm) == 1
    assert "load of migration failed: not a device-state file" in dm.output()
    assert not dm.qmp_path.exists()


async def test_sigterm_stops_cleanly(lab: Lab) -> None:
    domid = await lab.domain("guest")
    dm = await lab.start_dm(domid)
    dm.process.send_signal(signal.SIGTERM)
    assert await wait_exit(dm) == 0
    assert not dm.qmp_path.exists()


@pytest.mark.parametrize("device", ["stdvga", "cirrus", "qxl"])
async def test_the_display_sees_exactly_the_vram_pages_the_guest_wrote(
    lab: Lab, device: str
) -> None:
    src, dm = await lab.boot_and_draw("new", device)
    fb, length = guest_drivers.framebuffer(device, BAR, 320, 200, 32)
    async with open_qmp(dm.qmp_path) as q:
        first = await q.execute("x-vram-dirty")
        assert first["start_addr"] == BAR and first["page_size"] == 4096
        # A fresh range reads all dirty once: the drawn framebuffer is in it.
        assert set(range((fb - BAR) // 4096, (fb - BAR + length) // 4096)) <= set(first["pages"])
        assert (await q.execute("x-vram-dirty"))["pages"] == []
        rng = random.Random(device)
        for _ in range(4):
            pages = sorted(rng.sample(range(VRAM_MIB * 256), rng.randrange(1, 6)))
            ops = [
                {"op": "mem_write", "gpa": BAR + p * 4096 + 8, "data": rng.randbytes(8)}
                for p in pages
            ]
            await lab.hv.guest(src, ops)
            assert (await q.execute("x-vram-dirty"))["pages"] == pages
        assert await q.execute("xen-set-global-dirty-log", enable=True) == {}
        info = await q.execute("x-physmap-info")
        assert info["dirty_vram"]["in_migration"] is True
        assert info["dirty_vram"]["logging"] == [BAR, VRAM_MIB << 20]

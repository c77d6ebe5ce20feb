"""Short fuzz runs against the real processes: corrupt images through ``xl-sim restore``,
random and mutated QMP lines to a running qemu-model, random hypercall frames to
hypervisor-sim.  ``make fuzz`` runs the same code for longer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from physmap_lab.fuzz import fuzz_hypervisor, fuzz_qmp, fuzz_restores, leftovers, restore_image
from physmap_lab.stack import Stack
from toolstack import devicemodel
from toolstack.config import DomainConfig
from toolstack.image import read_image
from toolstack.libxl import open_libxl
from xenhost import RunDir


async def _saved_image(stack: Stack, tmp_path: Path) -> bytes:
    async with open_libxl(stack.rundir, command="test") as lx:
        created = await lx.create(DomainConfig(name="fuzz", memory_mib=16))
        await lx.save(created.domid, tmp_path / "good.img")
    return (tmp_path / "good.img").read_bytes()


def _corruptions(image: bytes, tmp_path: Path) -> dict[str, bytes]:
    with (tmp_path / "good.img").open("rb") as f:
        index = read_image(f)
    assert index.emulator_context is not None
    ctx_at, ctx_len = index.emulator_context
    libxl = image.index(b"LibxlFmt")
    libxc = image.index(b"\xff" * 8 + b"XENF")
    bad_state = bytearray(image)
    bad_state[ctx_at : ctx_at + ctx_len] = b"\x93" * ctx_len
    bad_type = bytearray(image)
    bad_type[libxl + 16 : libxl + 20] = struct.pack("<I", 0xDEAD)
    bad_count = bytearray(image)
    # The first PAGE_DATA record's count, just after the libxc image and domain headers.
    bad_count[libxc + 24 + 16 + 8 : libxc + 24 + 16 + 12] = struct.pack("<I", 0xFFFFFFFF)
    return {
        "bad xl magic": b"Xen saved domain, XL format" + image[27:],
        "truncated in guest memory": image[: len(image) // 3],
        "unknown record type": bytes(bad_type),
        "implausible page count": bytes(bad_count),
        "device state the device model cannot load": bytes(bad_state),
    }


async def test_corrupt_images_fail_to_restore_and_leave_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    image = await _saved_image(stack, tmp_path)
    assert await leftovers(stack) == []
    for name, data in _corruptions(image, tmp_path).items():
        path = tmp_path / "bad.img"
        path.write_bytes(data)
        outcome = await restore_image(stack.rundir, path, stack.env())
        assert outcome.rc == 1 and not outcome.traceback, name
        assert outcome.error, name
        assert await leftovers(stack) == [], name


async def test_mutated_images_through_xl_restore(stack: Stack, tmp_path: Path) -> None:
    image = await _saved_image(stack, tmp_path)
    report = await fuzz_restores(stack, image, 4, seed=5, scratch=tmp_path)
    assert report.ok, report.summary()
    assert report.frames == 4


async def test_qmp_fuzz_leaves_the_device_model_serving(stack: Stack, tmp_path: Path) -> None:
    async with open_libxl(stack.rundir, command="test") as lx:
        created = await lx.create(DomainConfig(name="qmp-fuzz", memory_mib=16))
    qmp = RunDir(stack.rundir).qmp_socket(created.domid)
    report = await fuzz_qmp(qmp, 600, seed=11, scratch=tmp_path / "dm", max_nesting=200)
    assert report.ok, report.summary()
    assert report.frames >= 600 and report.good_requests > 0
    assert devicemodel.pid_alive(created.dm_pid)
    log = RunDir(stack.rundir).dm_log(created.domid).read_text()
    assert "Traceback" not in log, log[-2000:]
    async with open_libxl(stack.rundir, command="test") as lx:
        await lx.unpause(created.domid)
        info = await lx.domain_info(created.domid)
        assert info["paused"] is False
        await lx.destroy(created.domid)


async def test_hypercall_fuzz_leaves_the_hypervisor_serving(stack: Stack) -> None:
    report = await fuzz_hypervisor(stack.hypervisor_socket, 3000, seed=3)
    assert report.ok, report.summary()
    assert report.frames == 3000 and report.good_requests > 0 and report.dropped > 0
    hv = stack.daemons["hypervisor"]
    assert hv.process is not None and hv.process.poll() is None
    log = hv.log_path.read_text()
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize("seed", [1, 2])
def test_frame_makers_are_deterministic(seed: int, tmp_path: Path) -> None:
    from physmap_lab.fuzz import HypercallFrameMaker, ImageMutator, QmpLineMaker

    a, b = HypercallFrameMaker(seed, 5), HypercallFrameMaker(seed, 5)
    assert [a.frame(i) for i in range(50)] == [b.frame(i) for i in range(50)]
    q1, q2 = QmpLineMaker(seed, tmp_path), QmpLineMaker(seed, tmp_path)
    assert [q1.line() for _ in range(50)] == [q2.line() for _ in range(50)]
    assert ImageMutator(seed).mutate(b"x" * 300) == ImageMutator(seed).mutate(b"x" * 300)

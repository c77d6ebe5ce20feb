"""The guest's video drivers (pure): the ops they emit and the shared pattern."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor_sim import guest_drivers as gd
from qemu_model import qxl

MODE = {"width": 640, "height": 480, "bpp": 32}


def test_pattern_is_deterministic_and_seeded() -> None:
    assert gd.pattern_bytes(1, 1000) == gd.pattern_bytes(1, 1000)
    assert gd.pattern_bytes(1, 1000) != gd.pattern_bytes(2, 1000)
    assert gd.pattern_bytes(1, 5000)[:1000] == gd.pattern_bytes(1, 1000)
    assert gd.pattern_bytes(3, 0) == b""
    with pytest.raises(ValueError):
        gd.pattern_bytes(1, -1)


@given(seed=st.integers(-(2**63), 2**63), n=st.integers(0, 70000))
def test_pattern_has_the_requested_length(seed: int, n: int) -> None:
    assert len(gd.pattern_bytes(seed, n)) == n


def test_pattern_pages_differ() -> None:
    data = gd.pattern_bytes(5, 1 << 20)
    pages = {data[i : i + 4096] for i in range(0, len(data), 4096)}
    assert len(pages) == 256  # a page moved to the wrong place would show


@pytest.mark.parametrize("device", gd.DEVICES)
def test_map_bar_programs_bar0_then_enables_decoding(device: str) -> None:
    ops = gd.ops_for(device, "map_bar", {"addr": 0xE0000000})
    assert ops[0] == {"op": "pci_cfg_write", "sbdf": 0x10, "reg": 4, "size": 2, "value": 0}
    assert {"op": "pci_cfg_write", "sbdf": 0x10, "reg": 0x10, "size": 4, "value": 0xE0000000} in ops
    assert ops[-1]["reg"] == 4 and ops[-1]["value"] & 0x2
    assert (ops[-1]["value"] & 0x1 == 1) == (device == "qxl")


def test_stdvga_mode_is_vbe() -> None:
    ops = gd.ops_for("stdvga", "set_mode", MODE)
    pairs = [(ops[i]["value"], ops[i + 1]["value"]) for i in range(0, len(ops), 2)]
    assert all(op["port"] in (0x1CE, 0x1CF) and op["size"] == 2 for op in ops)
    assert pairs == [(4, 0), (1, 640), (2, 480), (3, 32), (4, 0x41)]


def test_cirrus_mode_sets_geometry_then_linear_mode() -> None:
    ops = gd.ops_for("cirrus", "set_mode", {"width": 800, "height": 600, "bpp": 16})
    regs = {(ops[i]["port"], ops[i]["value"]): ops[i + 1]["value"] for i in range(0, len(ops), 2)}
    assert regs[0x3D4, 0x01] == 800 // 8 - 1
    assert regs[0x3D4, 0x12] == (600 - 1) & 0xFF
    assert regs[0x3D4, 0x07] == 0x40  # 599 = 0x257: bit 9 set, bit 8 clear
    assert regs[0x3D4, 0x13] == (800 * 2 // 8) & 0xFF and regs[0x3D4, 0x1B] == 0
    assert ops[-2:] == [
        {"op": "pio_write", "port": 0x3C4, "size": 1, "value": 0x07},
        {"op": "pio_write", "port": 0x3C5, "size": 1, "value": 0x07},
    ]


def test_qxl_mode_fills_the_ram_header_and_rings_the_io_ports() -> None:
    """The guest finds QXLRam at vram - ALIGN(sizeof(QXLRam), 4096) (qxl.c: init_qxl_ram) and
    writes mem_slot and create_surface at their offsets after log_buf and the rings."""
    ops = gd.ops_for("qxl", "set_mode", {**MODE, "addr": 0xF0000000, "vram_mib": 16})
    header = 0xF0000000 + (16 << 20) - qxl.QXL_RAM_HEADER_SIZE
    assert qxl.SIZEOF_QXLRAM == 5348 and qxl.QXL_RAM_HEADER_SIZE == 8192
    assert ops[2]["gpa"] == header + qxl.HDR_CREATE_SURFACE_OFFSET
    assert ops[0] == {
        "op": "mem_write",
        "gpa": header + qxl.HDR_MEM_SLOT_OFFSET,
        "data": struct.pack("<QQ", 0xF0000000, 0xF0000000 + (16 << 20)),
    }
    assert ops[1] == {"op": "pio_write", "port": 0xC000 + 8, "size": 1, "value": 0}
    w, h, stride, fmt, *_, mem = struct.unpack("<IIiIIIIIQ", ops[2]["data"])
    # QXLPHYSICAL: slot 0, offset 0 inside the slot.
    assert (w, h, stride, fmt, mem) == (640, 480, 640 * 4, 32, 0)
    assert ops[3]["port"] == 0xC000 + 12


@pytest.mark.parametrize("device", gd.DEVICES)
def test_draw_and_sha256_cover_the_framebuffer(device: str) -> None:
    gpa, length = gd.framebuffer(device, 0xF0000000, 640, 480, 32)
    assert (gpa, length) == (0xF0000000, 640 * 480 * 4)
    assert gd.ops_for(device, "draw", {**MODE, "seed": 3}) == [
        {"op": "mem_fill", "gpa": gpa, "len": length, "seed": 3}
    ]
    assert gd.ops_for(device, "sha256", MODE) == [{"op": "mem_sha256", "gpa": gpa, "len": length}]
    assert gd.driver_ops is gd.ops_for


@pytest.mark.parametrize(
    "device, action, params",
    [
        ("vesa", "map_bar", {}),
        ("stdvga", "reboot", {}),
        ("stdvga", "set_mode", {"width": 640, "height": 480}),
        ("stdvga", "set_mode", {**MODE, "bpp": 12}),
        ("cirrus", "set_mode", {**MODE, "width": 642}),
        ("qxl", "set_mode", {**MODE, "bpp": 8}),
        ("qxl", "set_mode", {**MODE, "vram_mib": 1}),
        ("stdvga", "map_bar", {"addr": 0x1234}),
        ("stdvga", "map_bar", {"addr": "0xf0000000"}),
        ("stdvga", "draw", MODE),
        ("stdvga", "framebuffer", MODE),
    ],
)
def test_bad_driver_requests_raise_value_error(
    device: str, action: str, params: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        gd.ops_for(device, action, params)

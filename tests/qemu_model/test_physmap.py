"""The physmap and restore flows of docs/qemu-physmap.md, 'Test labels' (K1, K2, R1-R6) at the pure
layer.

The guest is played by :mod:`hypervisor_sim.guest_drivers`: its ops become ioreqs to the
machine (config space, ports) or writes to the fake guest memory, as hypervisor-sim does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from hypervisor_sim import guest_drivers
from qemu_model.errors import CompatMap2Assertion, LoadError, QemuExit
from qemu_model.machine import Machine
from qemu_model.testing import FakeHypervisor, FakeXenStore
from qemu_model.xen_hvm import Mode, XenPhysmap, physmap_keys
from qemu_model.xenforeignmemory import ForeignMemory

MiB = 1 << 20
RAM = 16 * MiB
VRAM = 4 * MiB
BAR = 0xF0000000
MODE = {"width": 320, "height": 200, "bpp": 32}
SRC, DST = 1, 2


class Host:
    """A fake hypervisor and xenstore shared by the machines of one test."""

    def __init__(self) -> None:
        self.hv = FakeHypervisor()
        self.xs = FakeXenStore()
        self.machines: list[Machine] = []

    def machine(self, domid: int, mode: Mode, device: str, *, incoming: bool) -> Machine:
        m = Machine(
            domid=domid,
            mode=mode,
            device=device,
            ram_size=RAM,
            vram_size=VRAM,
            fmem=ForeignMemory(self.hv),
            hypercalls=self.hv,
            xenstore=self.xs,
            incoming=incoming,
        )
        self.machines.append(m)
        return m

    def guest(self, m: Machine, device: str, action: str, **params: Any) -> None:
        for op in guest_drivers.ops_for(device, action, {**MODE, "vram_mib": 4, **params}):
            kind = op["op"]
            if kind == "pci_cfg_write":
                addr = (op["sbdf"] << 32) | op["reg"]
                m.handle_ioreq("pci_config", "write", addr, op["size"], op["value"])
            elif kind == "pio_write":
                m.handle_ioreq("pio", "write", op["port"], op["size"], op["value"])
            elif kind == "mem_write":
                self.hv.write(m.domid, op["gpa"], op["data"])
            elif kind == "mem_fill":
                self.hv.write(
                    m.domid, op["gpa"], guest_drivers.pattern_bytes(op["seed"], op["len"])
                )
            else:
                raise AssertionError(f"unexpected op {op}")

    def boot_and_draw(self, mode: Mode, device: str, seed: int = 42) -> tuple[Machine, str]:
        """A fresh guest that maps the BAR, sets a mode and draws; returns the pattern hash."""
        m = self.machine(SRC, mode, device, incoming=False)
        m.runstate = "running"
        self.guest(m, device, "map_bar", addr=BAR)
        self.guest(m, device, "set_mode")
        self.guest(m, device, "draw", seed=seed)
        _, length = guest_drivers.framebuffer(device, BAR, 320, 200, 32)
        return m, hashlib.sha256(guest_drivers.pattern_bytes(seed, length)).hexdigest()

    def close(self) -> None:
        for m in self.machines:
            m.close()
        self.hv.close()


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    yield h
    h.close()


def migrate(host: Host, src: Machine) -> bytes:
    """Save the device state and copy the guest's memory into domain DST."""
    src.runstate = "paused"
    state = src.save_devices_state()
    host.hv.copy_domain(SRC, DST)
    return state


DEVICES = ["stdvga", "cirrus", "qxl"]


# --------------------------------------------------------------------------------------------
# Fresh boot


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["new", "compat", "pointer-fixup"])
def test_fresh_boot_relocates_vram_and_the_device_sees_the_drawing(
    host: Host, mode: Mode, device: str
) -> None:
    m, want = host.boot_and_draw(mode, device)
    info = m.info()
    assert info["physmap"] == [
        {"start_addr": BAR, "size": VRAM, "name": "vga.vram", "phys_offset": RAM}
    ]
    relocs = [c for c in host.hv.calls if c[0] == "relocate_memory"]
    assert relocs == [
        (
            "relocate_memory",
            {"domid": SRC, "src_gfn": RAM >> 12, "dst_gfn": BAR >> 12, "nr": VRAM >> 12},
        )
    ]
    # VRAM was populated at its ram_addr gfns by the device model (docs/qemu-physmap.md, 'VRAM and
    # the devices').
    assert ("populate_physmap", {"domid": SRC, "nr": VRAM >> 12}) in host.hv.calls
    assert info["display_sha256"] == want
    assert info["derived_ptrs_valid"]
    assert info["vram_ptr"] == info["vram_ptr_at_init"]


def test_k1_compat_writes_exactly_the_physmap_keys_in_order(host: Host) -> None:
    m, _ = host.boot_and_draw("compat", "stdvga")
    base = f"/local/domain/0/device-model/{SRC}/physmap/1000000"
    assert [e for e in host.xs.log if e[0] == "write"] == [
        ("write", f"{base}/start_addr"),
        ("write", f"{base}/size"),
        ("write", f"{base}/name"),
    ]
    assert host.xs.nodes == {
        f"{base}/start_addr": "f0000000",
        f"{base}/size": "400000",
        f"{base}/name": "vga.vram",
    }
    assert m.info()["xenstore_physmap_ops"] == 1 + 3  # the init directory read + 3 writes


def test_k1_key_format_matches_the_libxl_example() -> None:
    entry = XenPhysmap(0xF0000000, 0x800000, "vga.vram", 0x1F00000)
    assert physmap_keys(5, entry) == [
        ("/local/domain/0/device-model/5/physmap/1f00000/start_addr", "f0000000"),
        ("/local/domain/0/device-model/5/physmap/1f00000/size", "800000"),
        ("/local/domain/0/device-model/5/physmap/1f00000/name", "vga.vram"),
    ]
    assert [k for k, _ in physmap_keys(5, XenPhysmap(1, 2, None, 3))][-1].endswith("/size")


@pytest.mark.parametrize("mode", ["new", "pointer-fixup"])
def test_r2_new_modes_never_touch_xenstore(host: Host, mode: Mode) -> None:
    m, _ = host.boot_and_draw(mode, "qxl")
    assert host.xs.log == []
    assert m.info()["xenstore_physmap_ops"] == 0


def test_k2_legacy_window_and_other_blocks_are_not_tracked(host: Host) -> None:
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    vram = m.device.vga.vram
    assert m.xen.add_to_physmap(0xA0000, 0x20000, vram) == -1
    assert m.xen.add_to_physmap(0xBFFFF, 0x1000, vram) == -1
    other = m.ram.add("qxl.vrom", MiB)
    assert m.xen.add_to_physmap(BAR, MiB, other) == -1
    assert m.xen.physmap == []
    assert [e for e in host.xs.log if e[0] == "write"] == []


def test_k2_failed_relocation_writes_nothing(host: Host) -> None:
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    host.hv.fail_relocate = True
    host.guest(m, "stdvga", "map_bar", addr=BAR)
    assert [e for e in host.xs.log if e[0] == "write"] == []


def test_k2_unmap_keeps_the_keys_and_moves_the_frames_home(host: Host) -> None:
    m, _ = host.boot_and_draw("compat", "stdvga")
    keys = dict(host.xs.nodes)
    m.handle_ioreq("pci_config", "write", (0x10 << 32) | 0x04, 2, 0)  # memory decoding off
    assert m.xen.physmap == []
    assert host.hv.calls[-1] == (
        "relocate_memory",
        {"domid": SRC, "src_gfn": BAR >> 12, "dst_gfn": RAM >> 12, "nr": VRAM >> 12},
    )
    assert host.xs.nodes == keys
    # Mapping again at a new address overwrites the same phys_offset key (docs/qemu-physmap.md,
    # 'When QEMU writes the keys').
    host.guest(m, "stdvga", "map_bar", addr=0xE0000000)
    assert (
        host.xs.nodes[f"/local/domain/0/device-model/{SRC}/physmap/1000000/start_addr"]
        == "e0000000"
    )


# --------------------------------------------------------------------------------------------
# Restore


@pytest.mark.parametrize("device", DEVICES)
def test_r1_new_mode_restores_through_the_dummy_at_the_same_address(
    host: Host, device: str
) -> None:
    src, want = host.boot_and_draw("new", device)
    state = migrate(host, src)
    dst = host.machine(DST, "new", device, incoming=True)
    ptr = dst.device.vga.vram_ptr
    assert ptr is not None
    entry = next(e for _, e in dst.mapcache.entries() if e.vaddr_base == ptr)
    assert entry.dummy
    assert dst.display() is None  # no mode until the registers are loaded
    populates = [c for c in host.hv.calls if c[0] == "populate_physmap" and c[1]["domid"] == DST]
    assert populates == []  # INMIGRATE: no populate (docs/qemu-physmap.md, 'VRAM and the devices')
    dst.load_devices_state(state)
    info = dst.info()
    assert info["vram_ptr"] == info["vram_ptr_at_init"] == ptr == info["block_host"]
    assert not entry.dummy
    assert info["display_sha256"] == want
    assert info["derived_ptrs_valid"]
    assert len(info["physmap"]) == 1 and info["physmap"][0]["start_addr"] == BAR
    assert info["mapcache"]["replacements"] == 1
    assert [c for c in host.hv.calls if c[0] == "relocate_memory" and c[1]["domid"] == DST] == []
    assert host.xs.log == []  # R2
    # M4 across the whole restore: the VRAM range is registered exactly once.
    assert info["mapcache"]["notifier_calls"][-1] == ["add", ptr, VRAM]


def test_r1_cirrus_maps_the_vram_only_in_post_load(host: Host) -> None:
    src, _ = host.boot_and_draw("new", "cirrus")
    state = migrate(host, src)
    dst = host.machine(DST, "new", "cirrus", incoming=True)
    parsed = dst.check_devices_state(state)
    dst.device.load_config(parsed.pci_config)
    assert dst.device.bar0_addr() == BAR
    assert dst.xen.physmap == []  # BAR mapped, but not in linear VRAM mode yet
    dst.device.load_state(parsed.device_section)
    dst.device.post_load()
    assert [p.start_addr for p in dst.xen.physmap] == [BAR]


def test_r3_compat_with_keys_maps_real_vram_at_init(host: Host) -> None:
    src, want = host.boot_and_draw("compat", "stdvga")
    state = migrate(host, src)
    # libxl restores the keys for the new domain before it starts the device model
    # (docs/qemu-physmap.md, 'libxl: restore').
    for path, value in list(host.xs.nodes.items()):
        host.xs.nodes[path.replace(f"/device-model/{SRC}/", f"/device-model/{DST}/")] = value
    host.xs.log.clear()
    dst = host.machine(DST, "compat", "stdvga", incoming=True)
    ptr = dst.device.vga.vram_ptr
    assert ptr is not None
    base = f"/local/domain/0/device-model/{DST}/physmap"
    assert host.xs.log == [
        ("directory", base),
        ("read", f"{base}/1000000/start_addr"),
        ("read", f"{base}/1000000/size"),
        ("read", f"{base}/1000000/name"),
    ]
    assert dst.mapcache.stats.dummy_mappings == 0 and dst.mapcache.stats.translations == 1
    dst.load_devices_state(state)
    info = dst.info()
    assert info["mapcache"]["replacements"] == 0
    assert info["vram_ptr"] == ptr and info["display_sha256"] == want
    assert [e for e in host.xs.log if e[0] == "write"] == []


def test_r4_compat_without_keys_aborts_in_the_map2_shim(host: Host) -> None:
    src, _ = host.boot_and_draw("compat", "stdvga")
    state = migrate(host, src)
    dst = host.machine(DST, "compat", "stdvga", incoming=True)
    assert dst.mapcache.stats.dummy_mappings == 1  # translation found nothing: dummy
    with pytest.raises(CompatMap2Assertion):
        dst.load_devices_state(state)


def test_r5_qxl_pointer_fixup_leaves_derived_pointers_stale(host: Host) -> None:
    src, want = host.boot_and_draw("pointer-fixup", "qxl")
    state = migrate(host, src)
    dst = host.machine(DST, "pointer-fixup", "qxl", incoming=True)
    dst.load_devices_state(state)
    info = dst.info()
    assert info["vram_ptr"] != info["vram_ptr_at_init"]
    assert not info["derived_ptrs_valid"]
    assert info["derived_ptrs"]["ram"]["ptr"] == info["vram_ptr_at_init"] + VRAM - 4096
    # The surface is read through the stale memslot pointer: the zero dummy, not the drawing.
    assert info["display_sha256"] != want
    assert info["display_sha256"] == hashlib.sha256(bytes(320 * 200 * 4)).hexdigest()


@pytest.mark.parametrize("device", ["stdvga", "cirrus"])
def test_pointer_fixup_works_for_stdvga_and_cirrus(host: Host, device: str) -> None:
    src, want = host.boot_and_draw("pointer-fixup", device)
    state = migrate(host, src)
    dst = host.machine(DST, "pointer-fixup", device, incoming=True)
    dst.load_devices_state(state)
    info = dst.info()
    assert info["vram_ptr"] != info["vram_ptr_at_init"]
    assert info["display_sha256"] == want
    assert info["mapcache"]["replacements"] == 0


def test_r6_restrict_fails_in_compat_mode(host: Host) -> None:
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    with pytest.raises(QemuExit, match="xen: failed to restrict"):
        m.restrict(host.hv.restrict)
    assert host.hv.restricted_to is None


def test_restricted_new_mode_restores_without_xenstore(host: Host) -> None:
    src, want = host.boot_and_draw("new", "stdvga")
    state = migrate(host, src)
    dst = host.machine(DST, "new", "stdvga", incoming=True)
    dst.restrict(host.hv.restrict)
    assert host.hv.restricted_to == DST and dst.xen.xenstore is None
    dst.load_devices_state(state)
    assert dst.info()["display_sha256"] == want


def test_restricted_compat_write_would_fail_silently(host: Host) -> None:
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    m.xen.xenstore = None  # what a closed connection looks like
    host.guest(m, "stdvga", "map_bar", addr=BAR)
    assert len(m.xen.physmap) == 1  # the mapping still happened
    path = f"/local/domain/0/device-model/{SRC}/physmap/1000000/start_addr"
    assert m.xen.xenstore_accounting.ops[-1] == ("write", path, False)
    assert host.xs.nodes == {}


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "blob, why",
    [
        (b"", "not msgpack"),
        (b"\xc1garbage", "not msgpack"),
        (b"\x93\x01\x02\x03", "bad magic"),
    ],
)
def test_corrupt_state_is_rejected_before_anything_is_applied(
    host: Host, blob: bytes, why: str
) -> None:
    dst = host.machine(DST, "new", "stdvga", incoming=True)
    with pytest.raises(LoadError, match=why):
        dst.load_devices_state(blob)
    assert dst.xen.physmap == [] and dst.runstate == "inmigrate"


def test_state_for_another_device_is_rejected(host: Host) -> None:
    src, _ = host.boot_and_draw("new", "qxl")
    state = migrate(host, src)
    dst = host.machine(DST, "new", "stdvga", incoming=True)
    with pytest.raises(LoadError, match="'qxl'"):
        dst.load_devices_state(state)


def test_truncated_state_is_rejected(host: Host) -> None:
    src, _ = host.boot_and_draw("new", "cirrus")
    state = migrate(host, src)
    dst = host.machine(DST, "new", "cirrus", incoming=True)
    for cut in (1, len(state) // 2, len(state) - 1):
        with pytest.raises(LoadError):
            dst.load_devices_state(state[:cut])
    assert dst.xen.physmap == []


def test_ioreqs_to_nothing_float_high(host: Host) -> None:
    m = host.machine(SRC, "new", "stdvga", incoming=False)
    assert m.handle_ioreq("pci_config", "read", (0x18 << 32) | 0, 4, 0) == 0xFFFFFFFF
    assert m.handle_ioreq("pio", "read", 0x80, 1, 0) == 0xFF
    assert m.handle_ioreq("copy", "read", 0xFEB00000, 4, 0) == 0xFFFFFFFF
    assert m.handle_ioreq("pci_config", "read", (0x10 << 32) | 0, 4, 0) == 0x11111234
    assert m.handle_ioreq("pio", "write", 0x1CF, 2, 0xFFFF) == 0  # ignored register
    assert m.handle_ioreq("pci_config", "write", (0x10 << 32) | 0xFFF, 4, 1) == 0


def test_bar_sizing_reads_back_the_size(host: Host) -> None:
    m = host.machine(SRC, "new", "qxl", incoming=False)
    cfg = 0x10 << 32
    m.handle_ioreq("pci_config", "write", cfg | 0x10, 4, 0xFFFFFFFF)
    assert m.handle_ioreq("pci_config", "read", cfg | 0x10, 4, 0) == (~(VRAM - 1)) & 0xFFFFFFFF
    m.handle_ioreq("pci_config", "write", cfg | 0x1C, 4, 0xFFFFFFFF)
    assert m.handle_ioreq("pci_config", "read", cfg | 0x1C, 4, 0) == 0xFFFFFFE1
    assert m.xen.physmap == []  # decoding is off: nothing moved

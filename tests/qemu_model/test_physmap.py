"""The physmap and restore flows of qemu-physmap.md §7 (K1, K2, R1-R6) at the pure layer.

The guest is played by :mod:`hypervisor_sim.guest_drivers`: its ops become ioreqs to the
machine (config space, ports) or writes to the fake guest memory, as hypervisor-sim does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from hypervisor_sim import guest_drivers
from qemu_model.cirrus import Cirrus
from qemu_model.errors import CompatMap2Assertion, LoadError, QemuExit
from qemu_model.machine import Machine
from qemu_model.qxl import QXL
from qemu_model.testing import FakeHypervisor, FakeXenStore
from qemu_model.version import QemuVersion
from qemu_model.xen_hvm import Mode, XenPhysmap, physmap_keys, strtoull
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

    def machine(
        self, domid: int, mode: Mode, device: str, *, incoming: bool, version: str = "2.10"
    ) -> Machine:
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
            version=QemuVersion.parse(version),
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

    def boot_and_draw(
        self, mode: Mode, device: str, seed: int = 42, version: str = "2.10"
    ) -> tuple[Machine, str]:
        """A fresh guest that maps the BAR, sets a mode and draws; returns the pattern hash."""
        m = self.machine(SRC, mode, device, incoming=False, version=version)
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
    # QEMU 2.10 xen_add_to_physmap: one XENMAPSPACE_gmfn add_to_physmap per page, then the
    # cache attribute pin.
    moves = [c[1] for c in host.hv.calls if c[0] == "add_to_physmap"]
    assert moves == [
        {"domid": SRC, "idx": (RAM >> 12) + i, "gpfn": (BAR >> 12) + i} for i in range(VRAM >> 12)
    ]
    assert [c for c in host.hv.calls if c[0] == "relocate_memory"] == []
    assert (
        "pin_memory_cacheattr",
        {"domid": SRC, "start": BAR >> 12, "end": (BAR + VRAM - 1) >> 12, "type": 6},
    ) in host.hv.calls
    # VRAM was populated at its ram_addr gfns by the device model (§4.1).
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


def test_relocation_in_current_qemu_is_one_relocate_memory(host: Host) -> None:
    """Later xen_add_to_physmap: xendevicemodel_relocate_memory instead of the 2.10 loop."""
    host.boot_and_draw("new", "stdvga", version="current")
    assert [c for c in host.hv.calls if c[0] == "add_to_physmap"] == []
    assert [c for c in host.hv.calls if c[0] == "relocate_memory"] == [
        (
            "relocate_memory",
            {"domid": SRC, "src_gfn": RAM >> 12, "dst_gfn": BAR >> 12, "nr": VRAM >> 12},
        )
    ]


@pytest.mark.parametrize("device", ["stdvga", "cirrus"])
def test_xen_set_memory_never_removes_vram_that_logs_dirty(host: Host, device: str) -> None:
    """xen_set_memory returns early when log_dirty != add: stdvga and cirrus keep VGA dirty
    logging on (vga_common_init), so region_del never reaches xen_remove_from_physmap."""
    m, _ = host.boot_and_draw("compat", device)
    keys = dict(host.xs.nodes)
    calls = len(host.hv.calls)
    m.handle_ioreq("pci_config", "write", (0x10 << 32) | 0x04, 2, 0)  # memory decoding off
    assert [p.start_addr for p in m.xen.physmap] == [BAR]
    assert host.hv.calls[calls:] == []  # the frames stay at the old BAR address
    assert (SRC, BAR >> 12) in host.hv.p2m
    # A new BAR address gets an entry, but the frames are not at phys_offset to be moved.
    host.guest(m, device, "map_bar", addr=0xE0000000)
    if device == "cirrus":
        host.guest(m, device, "set_mode")
    assert [p.start_addr for p in m.xen.physmap] == [0xE0000000, BAR]
    assert host.xs.nodes == keys
    assert (SRC, BAR >> 12) in host.hv.p2m and (SRC, 0xE0000000 >> 12) not in host.hv.p2m


def test_xen_set_memory_qxl_native_mode_removes_but_never_adds(host: Host) -> None:
    """QXL leaves VGA mode (vga_dirty_log_stop) when it creates its primary surface: then a
    region_del moves the frames home and a region_add is skipped."""
    m, _ = host.boot_and_draw("new", "qxl")
    assert not m.device.vga.vram.log_dirty
    m.handle_ioreq("pci_config", "write", (0x10 << 32) | 0x04, 2, 0)  # decoding off
    assert m.xen.physmap == []
    assert (SRC, RAM >> 12) in host.hv.p2m
    m.handle_ioreq("pci_config", "write", (0x10 << 32) | 0x04, 2, 3)  # decoding on again
    assert m.xen.physmap == []
    assert (SRC, BAR >> 12) not in host.hv.p2m


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
    assert populates == []  # INMIGRATE: no populate (§4.1)
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
    # libxl restores the keys for the new domain before it starts the device model (§2.3).
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


def test_r5_qxl_pointer_fixup_leaves_d_ram_stale(host: Host) -> None:
    """The reconstructed fix-up updates block->host and vga.vram_ptr in xen_add_to_physmap,
    before qxl_post_load, so the SPICE memslots it re-adds are fresh and qxl_phys2virt follows
    the block; d->ram (init_qxl_ram) still points into the dummy."""
    src, want = host.boot_and_draw("pointer-fixup", "qxl")
    state = migrate(host, src)
    dst = host.machine(DST, "pointer-fixup", "qxl", incoming=True)
    dst.load_devices_state(state)
    info = dst.info()
    assert info["vram_ptr"] != info["vram_ptr_at_init"]
    assert info["vram_ptr"] == info["block_host"]
    assert not info["derived_ptrs_valid"]
    assert info["derived_ptrs"]["ram"]["ptr"] == info["vram_ptr_at_init"] + VRAM - 8192
    assert info["derived_ptrs"]["ram"]["expected"] == info["vram_ptr"] + VRAM - 8192
    assert info["derived_ptrs"]["spice_memslot0.virt_start"]["ptr"] == info["vram_ptr"]
    assert info["display_sha256"] == want
    # The guest's next request is read through d->ram: the dummy's zeros, not its header.
    host.guest(dst, "qxl", "set_mode")
    assert isinstance(dst.device, QXL)
    assert dst.device.last_io_error == "unsupported primary surface"


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


def test_xen_restrict_2_10_compat_starts_unrestricted(host: Host) -> None:
    """QEMU 2.10 xen_restrict (xen_common.h): the compat stubs answer ENOTTY, which counts as
    success, so a compat device model with -xen-domid-restrict starts and still writes keys."""
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    m.restrict(host.hv)
    assert m.restricted_handles == () and host.hv.restricted_to is None
    host.guest(m, "stdvga", "map_bar", addr=BAR)
    assert f"/local/domain/0/device-model/{SRC}/physmap/1000000/start_addr" in host.xs.nodes


@pytest.mark.parametrize("version", ["3.0", "current"])
def test_xen_setup_post_restrict_all_refuses_compat(host: Host, version: str) -> None:
    """From QEMU 3.0 xentoolcore_restrict_all is the compat stub (ENOTTY): QEMU exits."""
    m = host.machine(SRC, "compat", "stdvga", incoming=False, version=version)
    with pytest.raises(QemuExit, match="xen: failed to restrict"):
        m.restrict(host.hv)
    assert host.hv.restricted_to is None


def test_xen_restrict_2_10_keeps_xenstore_open(host: Host) -> None:
    """2.10 restricts the devicemodel and foreignmemory handles only."""
    m = host.machine(DST, "new", "stdvga", incoming=True)
    m.restrict(host.hv)
    assert host.hv.restricted_handles == ["devicemodel", "foreignmemory"]
    assert m.xen.xenstore is host.xs


@pytest.mark.parametrize("version", ["3.0", "current"])
def test_restricted_new_mode_restores_without_xenstore(host: Host, version: str) -> None:
    src, want = host.boot_and_draw("new", "stdvga")
    state = migrate(host, src)
    dst = host.machine(DST, "new", "stdvga", incoming=True, version=version)
    dst.restrict(host.hv)
    assert host.hv.restricted_handles == ["all"]
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


# --------------------------------------------------------------------------------------------
# Smaller corrections


@pytest.mark.parametrize(
    "text, value",
    [
        ("f0000000", 0xF0000000),
        ("0x1f00000", 0x1F00000),
        ("  12zz", 0x12),
        ("garbage", 0),
        ("", 0),
        ("-1", (1 << 64) - 1),
        ("1" * 20, (1 << 64) - 1),
    ],
)
def test_xen_read_physmap_parses_with_strtoull(text: str, value: int) -> None:
    """xen_read_physmap: strtoull(value, NULL, 16), unchecked."""
    assert strtoull(text) == value


def test_xen_read_physmap_inserts_garbage_entries(host: Host) -> None:
    """Garbage becomes 0 or its numeric prefix and the entry is still inserted."""
    base = f"/local/domain/0/device-model/{SRC}/physmap/zz"
    host.xs.nodes.update({f"{base}/start_addr": "f0000000junk", f"{base}/size": "nope"})
    m = host.machine(SRC, "compat", "stdvga", incoming=False)
    assert [p.to_json() for p in m.xen.physmap] == [
        {"start_addr": 0xF0000000, "size": 0, "name": None, "phys_offset": 0}
    ]


@pytest.mark.parametrize("version, want", [("2.10", BAR), ("current", BAR + 0x3000)])
def test_xen_phys_offset_to_gaddr(host: Host, version: str, want: int) -> None:
    """QEMU 2.10 returns the entry's start_addr; current QEMU adds the offset inside it."""
    m = host.machine(SRC, "compat", "stdvga", incoming=False, version=version)
    m.xen.physmap.insert(0, XenPhysmap(BAR, VRAM, "vga.vram", RAM))
    assert m.xen.phys_offset_to_gaddr(RAM + 0x3000, 0x1000) == want
    assert m.xen.phys_offset_to_gaddr(0x5000, 0x1000) == 0x5000


def test_xen_add_to_physmap_ignores_offset_within_region(host: Host) -> None:
    """phys_offset is memory_region_get_ram_addr(mr), whatever the section's offset."""
    m = host.machine(SRC, "new", "stdvga", incoming=False)
    m.xen.add_to_physmap(BAR, VRAM, m.device.vga.vram)
    assert m.xen.physmap[0].phys_offset == RAM


def _cirrus(host: Host) -> tuple[Machine, Cirrus]:
    m = host.machine(SRC, "new", "cirrus", incoming=False)
    assert isinstance(m.device, Cirrus)
    return m, m.device


def _reg(m: Machine, index_port: int, reg: int, value: int) -> None:
    m.handle_ioreq("pio", "write", index_port, 2, reg | value << 8)


def test_cirrus_update_memory_access_maps_vram_in_text_mode(host: Host) -> None:
    """cirrus_update_memory_access does not test SR07 bit 0: a text-mode guest (GR05 mode 0)
    has its linear VRAM mapped, and Xen relocates it."""
    m, dev = _cirrus(host)
    assert not dev.linear_vram  # cirrus_reset
    host.guest(m, "cirrus", "map_bar", addr=BAR)
    assert m.xen.physmap == []
    _reg(m, 0x3CE, 0x05, 0x10)  # GR05: a text-mode write, SR07 untouched
    assert dev.sr[0x07] & 1 == 0
    assert dev.linear_vram and [p.start_addr for p in m.xen.physmap] == [BAR]


@pytest.mark.parametrize(
    "port, reg, value",
    [
        (0x3C4, 0x17, 0x44),  # SR17 memory-mapped I/O
        (0x3CE, 0x0B, 0x14),  # GR0B
        (0x3CE, 0x0B, 0x02),  # GR0B bit 1
    ],
)
def test_cirrus_update_memory_access_unmaps_for_bank_and_blit_modes(
    host: Host, port: int, reg: int, value: int
) -> None:
    m, dev = _cirrus(host)
    _reg(m, 0x3CE, 0x05, 0)
    assert dev.linear_vram
    _reg(m, port, reg, value)
    assert not dev.linear_vram


def test_cirrus_update_memory_access_modes_4_and_5_need_gr0b_bit_2(host: Host) -> None:
    m, dev = _cirrus(host)
    _reg(m, 0x3CE, 0x05, 0x04)  # write mode 4, GR0B bit 2 clear: still linear
    assert dev.linear_vram
    _reg(m, 0x3CE, 0x0B, 0x04)
    assert not dev.linear_vram
    dev.blit_in_progress = True
    _reg(m, 0x3CE, 0x05, 0x00)
    assert not dev.linear_vram


def test_qxl_phys2virt_recomputes_from_the_ram_block(host: Host) -> None:
    """qxl_phys2virt: memory_region_get_ram_ptr(mr) + offset on every call, so it follows the
    block; the SPICE memslot keeps the address it was given."""
    m, _ = host.boot_and_draw("new", "qxl")
    dev = m.device
    assert isinstance(dev, QXL)
    slot = dev.guest_slots[0]
    assert slot.active and slot.mr is dev.vga.vram and slot.offset == 0 and slot.delta == 0
    assert slot.size == VRAM
    host_ptr = dev.vga.vram.host
    assert host_ptr is not None
    assert dev.phys2virt(0x1000) == host_ptr + 0x1000
    assert dev.phys2virt(1 << 56) is None  # slot 1 is not active
    assert dev.spice_memslots[0].virt_start == host_ptr
    dev.vga.vram.host = host_ptr + 0x100000  # as if the block moved
    assert dev.phys2virt(0x1000) == host_ptr + 0x100000 + 0x1000
    assert dev.spice_virt(0x1000) == host_ptr + 0x1000
    dev.vga.vram.host = host_ptr

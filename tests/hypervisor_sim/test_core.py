"""The pure core: p2m, frames, relocation, restriction and ioreq bookkeeping."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor_sim.core import (
    EXTRA_PAGES,
    DomainCreated,
    DomainDestroyed,
    Hypervisor,
    IoreqDone,
    map2_available,
)
from hypervisor_sim.frames import PAGE_SIZE
from hypervisor_sim.protocol import HypercallError

DM, TOOL = 1, 2


@pytest.fixture
def hv(tmp_path: pathlib.Path) -> Iterator[Hypervisor]:
    core = Hypervisor(os.fspath(tmp_path))
    core.connect(DM)
    core.connect(TOOL)
    yield core
    core.destroy_all()


def _domain(hv: Hypervisor, pages: int = 16) -> int:
    domid = hv.call(TOOL, "domain_create", {"name": "g", "max_pages": pages})["domid"]
    assert isinstance(domid, int)
    return domid


def _errno(hv: Hypervisor, conn: int, call: str, args: dict[str, Any]) -> str:
    with pytest.raises(HypercallError) as exc:
        hv.call(conn, call, args)
    return exc.value.errno_name


def _frame_bytes(hv: Hypervisor, domid: int, gfn: int) -> bytes:
    d = hv.domains[domid]
    return d.frames.read(d.p2m[gfn], 0, PAGE_SIZE)


def test_populate_and_decrease(hv: Hypervisor) -> None:
    domid = _domain(hv, pages=4)
    assert hv.take_effects() == [DomainCreated(domid)]
    assert hv.domains[domid].paused
    assert hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [5, 6, 9]}) == 3
    assert hv.call(TOOL, "p2m", {"domid": domid}) == [[5, 2], [9, 1]]
    assert _errno(hv, TOOL, "populate_physmap", {"domid": domid, "gfns": [1, 6]}) == "EEXIST"
    assert _errno(hv, TOOL, "populate_physmap", {"domid": domid, "gfns": [1, 1]}) == "EEXIST"
    assert hv.call(TOOL, "p2m", {"domid": domid}) == [[5, 2], [9, 1]]  # all or nothing
    assert hv.call(TOOL, "decrease_reservation", {"domid": domid, "gfns": [6, 7]}) == 1
    assert hv.call(TOOL, "domain_getinfo", {"domid": domid})["tot_pages"] == 2
    assert _errno(hv, TOOL, "populate_physmap", {"domid": domid, "gfns": [-1]}) == "EINVAL"
    assert _errno(hv, TOOL, "p2m", {"domid": domid + 1}) == "ESRCH"


def test_device_model_memory_may_exceed_max_pages_by_a_margin(hv: Hypervisor) -> None:
    domid = _domain(hv, pages=2)
    extra = list(range(0x10000, 0x10000 + EXTRA_PAGES))
    assert hv.call(DM, "populate_physmap", {"domid": domid, "gfns": [0, 1, *extra]}) > 0
    assert _errno(hv, DM, "populate_physmap", {"domid": domid, "gfns": [2]}) == "ENOMEM"


def test_freed_frames_are_zeroed_and_reused(hv: Hypervisor) -> None:
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [0, 1]})
    d = hv.domains[domid]
    d.frames.write(d.p2m[1], 10, b"secret")
    mfn = d.p2m[1]
    hv.call(TOOL, "decrease_reservation", {"domid": domid, "gfns": [1]})
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [7]})
    assert d.p2m[7] == mfn
    assert _frame_bytes(hv, domid, 7) == bytes(PAGE_SIZE)
    assert d.frames.nframes == 2


def test_relocation_moves_the_mapping_not_the_data(hv: Hypervisor) -> None:
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [0x100, 0x101, 0xF0000]})
    d = hv.domains[domid]
    mfns = [d.p2m[0x100], d.p2m[0x101]]
    displaced = d.p2m[0xF0000]
    d.frames.write(mfns[0], 0, b"vram0")
    d.frames.write(mfns[1], 0, b"vram1")
    hv.call(DM, "relocate_memory", {"domid": domid, "src_gfn": 0x100, "dst_gfn": 0xF0000, "nr": 2})
    assert [d.p2m[0xF0000], d.p2m[0xF0001]] == mfns
    assert 0x100 not in d.p2m and 0x101 not in d.p2m
    assert _frame_bytes(hv, domid, 0xF0001)[:5] == b"vram1"
    assert d.tot_pages == 2  # the frame that sat at the destination was freed
    hv.call(DM, "populate_physmap", {"domid": domid, "gfns": [0x200]})
    assert d.p2m[0x200] == displaced
    hv.call(DM, "add_to_physmap", {"domid": domid, "space": "gmfn", "idx": 0xF0000, "gpfn": 0x100})
    assert d.p2m[0x100] == mfns[0]


def test_relocation_errors(hv: Hypervisor) -> None:
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [0]})
    args = {"domid": domid, "src_gfn": 0, "dst_gfn": 10, "nr": 2}
    with pytest.raises(HypercallError, match="1 of 2 moved") as exc:
        hv.call(DM, "relocate_memory", args)
    assert exc.value.errno_name == "EINVAL"
    bad_space = {"domid": domid, "space": "gmfn_foreign", "idx": 10, "gpfn": 0}
    assert _errno(hv, DM, "add_to_physmap", bad_space) == "EOPNOTSUPP"
    neg = {"domid": domid, "src_gfn": 0, "dst_gfn": 1, "nr": -1}
    assert _errno(hv, DM, "relocate_memory", neg) == "EINVAL"


def test_map_foreign_reports_einval_for_unpopulated_frames(hv: Hypervisor) -> None:
    """mod_l1_entry (xen/arch/x86/mm.c) refuses an unpopulated gfn with EINVAL; ENOENT is
    for paged-out frames."""
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [3, 4]})
    d = hv.domains[domid]
    got = hv.call(DM, "map_foreign", {"domid": domid, "gfns": [4, 5, 3]})
    assert got == {
        "mem_path": os.path.join(hv.mem_dir, f"dom{domid}.mem"),
        "offsets": [d.p2m[4] * PAGE_SIZE, -1, d.p2m[3] * PAGE_SIZE],
        "errors": ["", "EINVAL", ""],
    }


def test_restrict_limits_a_connection_to_one_domain(hv: Hypervisor) -> None:
    d1, d2 = _domain(hv), _domain(hv)
    hv.call(DM, "restrict", {"domid": d1})
    assert hv.call(DM, "map_foreign", {"domid": d1, "gfns": []})["offsets"] == []
    assert _errno(hv, DM, "map_foreign", {"domid": d2, "gfns": [0]}) == "EPERM"
    assert _errno(hv, DM, "domain_list", {}) == "EPERM"
    assert _errno(hv, DM, "domain_create", {"name": "x", "max_pages": 1}) == "EPERM"
    assert _errno(hv, DM, "restrict", {"domid": d2}) == "EINVAL"
    hv.call(DM, "restrict", {"domid": d1})
    assert hv.call(DM, "version", {})["xen"] == "4.17"
    assert len(hv.call(TOOL, "domain_list", {})) == 2


def test_destroy_removes_the_memory_file(hv: Hypervisor) -> None:
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [0]})
    path = hv.domains[domid].frames.path
    assert os.path.exists(path)
    hv.take_effects()
    hv.call(TOOL, "domain_destroy", {"domid": domid})
    assert not os.path.exists(path)
    assert hv.take_effects() == [DomainDestroyed(domid)]
    assert _domain(hv) == domid + 1  # domids are not reused


def test_ioreq_bookkeeping(hv: Hypervisor) -> None:
    domid = _domain(hv)
    assert hv.ioreq_send(domid, "pio", "read", 0x1CE, 2, 0) is None
    sid = hv.call(DM, "ioreq_server_create", {"domid": domid})["id"]
    assert _errno(hv, TOOL, "ioreq_server_create", {"domid": domid}) == "EEXIST"
    sent = hv.ioreq_send(domid, "pio", "read", 0x1CE, 2, 0)
    assert sent is not None
    conn, event = sent
    assert conn == DM and event["event"] == "ioreq" and event["type"] == "pio"
    assert _errno(hv, TOOL, "ioreq_complete", {"seq": event["seq"], "data": 1}) == "ENOENT"
    hv.take_effects()
    hv.call(DM, "ioreq_complete", {"seq": event["seq"], "data": 0x12345})
    assert hv.take_effects() == [IoreqDone(event["seq"], 0x2345)]
    assert _errno(hv, DM, "ioreq_complete", {"seq": event["seq"]}) == "ENOENT"
    # A write's data is masked to its size and its completion carries nothing.
    sent = hv.ioreq_send(domid, "copy", "write", 0xE0000000, 1, 0x1FF)
    assert sent is not None and sent[1]["data"] == 0xFF
    reads = [hv.ioreq_send(domid, "pci_config", "read", 0x10 << 32, 4, 0) for _ in range(2)]
    assert _errno(hv, TOOL, "ioreq_server_destroy", {"domid": domid, "id": sid}) == "EPERM"
    hv.disconnect(DM)
    done = hv.take_effects()
    seqs = [sent[1]["seq"]] + [r[1]["seq"] for r in reads if r is not None]
    assert sorted(done, key=lambda e: e.seq if isinstance(e, IoreqDone) else 0) == [
        IoreqDone(seqs[0], 0),
        IoreqDone(seqs[1], 0xFFFFFFFF),
        IoreqDone(seqs[2], 0xFFFFFFFF),
    ]
    assert not hv.has_ioreq_server(domid)


def test_segments_split_at_pages(hv: Hypervisor) -> None:
    domid = _domain(hv)
    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [1]})
    mfn = hv.domains[domid].p2m[1]
    got = list(hv.segments(domid, 0xFFE, 0x1004))
    assert got == [(0xFFE, 2, None), (0x1000, 0x1000, mfn), (0x2000, 2, None)]


@pytest.mark.parametrize(
    ("libs", "has"), [("4.9", False), ("4.10", True), ("4.17", True), ("x", False)]
)
def test_map2_gate(libs: str, has: bool) -> None:
    assert map2_available(libs) is has


ops = st.lists(
    st.tuples(
        st.sampled_from(["populate", "decrease", "move"]), st.integers(0, 12), st.integers(0, 12)
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_p2m_matches_a_model(script: list[tuple[str, int, int]]) -> None:
    """Frames carry a tag; whatever the ops, each gfn shows the tag of the frame the model says."""
    with tempfile.TemporaryDirectory() as tmp:
        hv = Hypervisor(tmp)
        hv.connect(TOOL)
        domid = _domain(hv, pages=64)
        d = hv.domains[domid]
        model: dict[int, bytes] = {}
        tag = peak = 0
        for op, a, b in script:
            try:
                if op == "populate":
                    hv.call(TOOL, "populate_physmap", {"domid": domid, "gfns": [a]})
                    tag += 1
                    d.frames.write(d.p2m[a], 0, tag.to_bytes(4, "little"))
                    model[a] = tag.to_bytes(4, "little")
                elif op == "decrease":
                    hv.call(TOOL, "decrease_reservation", {"domid": domid, "gfns": [a]})
                    model.pop(a, None)
                else:
                    args = {"domid": domid, "space": "gmfn", "idx": a, "gpfn": b}
                    hv.call(TOOL, "add_to_physmap", args)
                    model[b] = model.pop(a)
            except HypercallError as exc:
                assert (op, exc.errno_name) in {("populate", "EEXIST"), ("move", "EINVAL")}
                assert (a in model) == (op == "populate")
            peak = max(peak, len(model))
        assert {g: d.frames.read(m, 0, 4) for g, m in d.p2m.items()} == model
        assert len(set(d.p2m.values())) == len(d.p2m)  # no frame is mapped twice
        assert d.frames.nframes == peak  # freed frames are reused before the file grows
        hv.destroy_all()


def test_cpu_time_counts_only_the_unpaused_time(tmp_path: pathlib.Path) -> None:
    now = [1_000]
    hv = Hypervisor(str(tmp_path), clock=lambda: now[0])
    hv.connect(1)
    domid = hv.call(1, "domain_create", {"name": "t", "max_pages": 16})["domid"]
    assert isinstance(domid, int)

    def cpu() -> int:
        return int(hv.call(1, "domain_getinfo", {"domid": domid})["cpu_time"])

    now[0] += 500  # created paused: nothing runs
    assert cpu() == 0
    hv.call(1, "domain_unpause", {"domid": domid})
    now[0] += 700
    assert cpu() == 700
    hv.call(1, "domain_pause", {"domid": domid})
    now[0] += 10_000
    assert cpu() == 700
    hv.call(1, "domain_unpause", {"domid": domid})
    now[0] += 5
    assert [d["cpu_time"] for d in hv.call(1, "domain_list", {})] == [705]
    hv.destroy_all()


def test_pin_memory_cacheattr_is_recorded_and_checks_its_range(hv: Hypervisor) -> None:
    """XEN_DOMCTL_pin_mem_cacheattr, as xen_add_to_physmap calls it after relocating."""
    domid = _domain(hv)
    hv.call(
        DM, "pin_memory_cacheattr", {"domid": domid, "start": 0xF0000, "end": 0xF03FF, "type": 6}
    )
    assert hv.domains[domid].pinned_cacheattr == [(0xF0000, 0xF03FF, 6)]
    assert (
        _errno(hv, DM, "pin_memory_cacheattr", {"domid": domid, "start": 2, "end": 1, "type": 6})
        == "EINVAL"
    )

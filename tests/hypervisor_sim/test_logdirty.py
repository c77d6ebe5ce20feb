"""Log-dirty, dirty VRAM and modified_memory against a real hypervisor-sim, with real writers:
the guest actor, processes that keep a foreign mapping, and processes that map, write and unmap
between two looks at the log."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import pytest

from hypervisor_sim.client import HypervisorClient, open_hypervisor
from hypervisor_sim.logdirty import DigestLog, from_bitmap, to_bitmap
from hypervisor_sim.protocol import HypercallError

PAGE = 4096
PAGES = 256

# A writer process: each stdin line "GFN HEX" writes bytes at the start of the gfn's page.
# With KEEP=1 it maps every page once and keeps the mapping; otherwise it maps the one page,
# writes and unmaps it before answering, so no mapping of it survives to the next look.
_WRITER = """
import sys
from hypervisor_sim import vma
from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.xenforeignmemory import ForeignMemory
sock, domid, pages, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
with Privcmd(sock) as p:
    fm = ForeignMemory(p)
    base = fm.map2(domid, None, vma.PROT_RW, 0, list(range(pages)))[0] if keep else 0
    for line in sys.stdin:
        gfn, data = int(line.split()[0]), bytes.fromhex(line.split()[1])
        if keep:
            vma.write(base + gfn * 4096, data)
        else:
            va, _ = fm.map2(domid, None, vma.PROT_RW, 0, [gfn])
            vma.write(va, data)
            fm.unmap(va, 1)
        print("ok", flush=True)
"""


class Writer:
    def __init__(self, sock: Any, domid: int, keep: bool) -> None:
        args = [sys.executable, "-c", _WRITER, str(sock), str(domid), str(PAGES), str(int(keep))]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def write(self, gfn: int, data: bytes) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{gfn} {data.hex()}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


async def _domain(hv: HypervisorClient) -> int:
    domid = await hv.domain_create("ld", max_pages=PAGES)
    await hv.populate_physmap(domid, range(PAGES))
    await hv.domain_unpause(domid)
    return domid


async def test_every_write_of_every_writer_is_in_the_dirty_log(hypervisor: Any) -> None:
    rng = random.Random(1606)
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await _domain(hv)
        first = await hv.shadow_op(domid, "enable_logdirty")
        assert first is not None and first["pages"] == list(range(PAGES))
        assert first["dirty_count"] == 0 and len(set(first["digests"])) == 1  # all zero pages
        writers = [Writer(hypervisor.sock, domid, keep) for keep in (True, True, False)]
        try:
            for _round in range(12):
                written: set[int] = set()
                for _ in range(rng.randrange(0, 24)):
                    gfn = rng.randrange(PAGES)
                    data = rng.randbytes(rng.choice((1, 8, 100, PAGE)))
                    who = rng.randrange(len(writers) + 1)
                    if who == len(writers):
                        op = {"op": "mem_write", "gpa": gfn * PAGE, "data": data}
                        await hv.guest(domid, [op])
                    else:
                        writers[who].write(gfn, data)
                    written.add(gfn)
                peeked = await hv.shadow_op(domid, "peek")
                cleaned = await hv.shadow_op(domid, "clean")
                assert peeked is not None and cleaned is not None
                # A random byte may equal the one it overwrote: those pages did not change.
                assert set(cleaned["pages"]) <= written
                assert len(written) - len(cleaned["pages"]) <= 1
                assert peeked["pages"] == cleaned["pages"]
                assert cleaned["dirty_count"] == len(cleaned["pages"])
                assert all(len(d) == 20 for d in cleaned["digests"])
            again = await hv.shadow_op(domid, "clean")
            assert again is not None and again["pages"] == []
        finally:
            for w in writers:
                w.close()
        await hv.shadow_op(domid, "off")


async def test_page_sized_random_writes_are_all_seen(hypervisor: Any) -> None:
    rng = random.Random(7)
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await _domain(hv)
        await hv.shadow_op(domid, "enable_logdirty")
        w = Writer(hypervisor.sock, domid, keep=False)
        try:
            for _round in range(5):
                written = set(rng.sample(range(PAGES), 20))
                for gfn in written:
                    w.write(gfn, rng.randbytes(64))
                cleaned = await hv.shadow_op(domid, "clean")
                assert cleaned is not None and set(cleaned["pages"]) == written
        finally:
            w.close()


async def test_p2m_changes_and_marks_are_dirty(hypervisor: Any) -> None:
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await _domain(hv)
        await hv.shadow_op(domid, "enable_logdirty")
        await hv.populate_physmap(domid, [PAGES + 5])
        await hv.decrease_reservation(domid, [3])
        await hv.modified_memory(domid, 10, 2)
        cleaned = await hv.shadow_op(domid, "clean")
        assert cleaned is not None
        assert cleaned["pages"] == [3, 10, 11, PAGES + 5]
        assert cleaned["digests"][0] == b""
        with pytest.raises(HypercallError) as exc:
            await hv.shadow_op(domid, "enable_logdirty")
        assert exc.value.errno_name == "EINVAL"
        with pytest.raises(HypercallError) as exc:
            await hv.modified_memory(domid, 3, 1)
        assert exc.value.errno_name == "EINVAL"
        await hv.shadow_op(domid, "off")
        for bad in ("peek", "clean", "off", "frobnicate"):
            with pytest.raises(HypercallError) as exc:
                await hv.shadow_op(domid, bad)
            assert exc.value.errno_name == "EINVAL"
        # With neither log on, modified_memory is accepted and does nothing.
        await hv.modified_memory(domid, 10, 1)


async def test_track_dirty_vram_reports_the_range(hypervisor: Any) -> None:
    async with open_hypervisor(hypervisor.sock) as hv:
        domid = await _domain(hv)
        first, nr = 16, 20
        assert from_bitmap(await hv.track_dirty_vram(domid, first, nr), first) == list(
            range(first, first + nr)
        )
        assert from_bitmap(await hv.track_dirty_vram(domid, first, nr), first) == []
        w = Writer(hypervisor.sock, domid, keep=True)
        try:
            w.write(first + 3, b"\x01\x02")
            w.write(first + nr + 1, b"\x01\x02")  # outside the range
        finally:
            w.close()
        await hv.guest(domid, [{"op": "mem_fill", "gpa": (first + 19) * PAGE, "len": 4, "seed": 5}])
        await hv.modified_memory(domid, first + 7, 1)
        bitmap = await hv.track_dirty_vram(domid, first, nr)
        assert len(bitmap) == 3
        assert from_bitmap(bitmap, first) == [first + 3, first + 7, first + 19]
        # Another range starts afresh; nr = 0 stops.
        assert len(from_bitmap(await hv.track_dirty_vram(domid, 0, 4))) == 4
        assert await hv.track_dirty_vram(domid, 0, 0) == b""
        assert len(from_bitmap(await hv.track_dirty_vram(domid, 0, 4))) == 4
        with pytest.raises(HypercallError) as exc:
            await hv.track_dirty_vram(domid, -1, 4)
        assert exc.value.errno_name == "EINVAL"


def test_digest_log_peek_keeps_and_clean_resets() -> None:
    log = DigestLog({1: b"a", 2: b"b"})
    assert log.look({1: b"a", 2: b"c", 3: b"d"}, clean=False).gfns == [2, 3]
    log.mark([1])
    found = log.look({2: b"c", 3: b"d"}, clean=True)
    assert found.gfns == [1, 2, 3] and found.digests == [b"", b"c", b"d"]
    assert log.look({2: b"c", 3: b"d"}, clean=True).gfns == []


def test_bitmap_round_trip() -> None:
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randrange(1, 300)
        bits = sorted(rng.sample(range(n), rng.randrange(0, n)))
        bm = to_bitmap(bits, n)
        assert len(bm) == (n + 7) // 8
        assert from_bitmap(bm, 9) == [b + 9 for b in bits]
    assert os.urandom(0) == to_bitmap([], 0)

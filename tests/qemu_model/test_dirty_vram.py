"""The device model's dirty-VRAM bookkeeping against a recording hypervisor (pure ring)."""

from __future__ import annotations

from hypervisor_sim.logdirty import to_bitmap
from hypervisor_sim.protocol import HypercallError
from qemu_model.dirty_vram import DirtyVram


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.bitmap = b""
        self.fail = False

    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes:
        self.calls.append(("track", first_pfn, nr))
        if self.fail:
            raise HypercallError("EINVAL", "no")
        return self.bitmap

    def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None:
        self.calls.append(("modified", first_pfn, nr))


def test_sync_folds_bitmaps_until_the_display_asks() -> None:
    hc = Recorder()
    dv = DirtyVram(1, hc)
    assert dv.get_and_clear() == [] and hc.calls == []  # no log, no call
    hc.bitmap = to_bitmap([0, 9], 16)
    dv.log_start(0xF0000000, 16 * 4096)
    assert hc.calls == [("track", 0xF0000, 16)]
    hc.bitmap = to_bitmap([3, 40], 48)  # bits past the range are ignored
    assert dv.get_and_clear() == [0, 3, 9]
    hc.fail = True
    assert dv.get_and_clear() == list(range(16))
    dv.log_stop()
    assert hc.calls[-1] == ("track", 0, 0)
    dv.log_stop()
    assert hc.calls[-1] == ("track", 0, 0) and len(hc.calls) == 4


def test_modified_memory_only_while_migrating() -> None:
    hc = Recorder()
    dv = DirtyVram(1, hc)
    dv.modified_memory(0x1000, 10)
    assert hc.calls == []
    dv.log_global_start()
    dv.modified_memory(0x1FFF, 2)  # straddles two pages
    dv.modified_memory(0x5000, 0)
    dv.log_global_stop()
    dv.modified_memory(0x1000, 10)
    assert hc.calls == [("modified", 1, 2)]


def test_without_hypervisor_help_everything_is_dirty() -> None:
    dv = DirtyVram(1, None)
    dv.log_start(0, 3 * 4096 + 1)
    assert dv.get_and_clear() == [0, 1, 2, 3]
    dv.log_global_start()
    dv.modified_memory(0, 4096)
    dv.log_stop()
    assert dv.info()["logging"] is None

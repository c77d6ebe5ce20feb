"""Dirty tracking of the framebuffer, as QEMU's Xen memory listener does it.

QEMU (hw/i386/xen/xen-hvm.c) keeps the display's dirty bits for VRAM with the hypervisor's help:
``xen_log_start``/``xen_sync_dirty_bitmap`` ask ``xc_hvm_track_dirty_vram`` for the pages of the
relocated framebuffer (the physmap entry at the BAR) that the guest wrote since the last call
and set them dirty for the VGA client; ``xen_log_stop`` ends the tracking with ``nr = 0``;
``xen_log_global_start``/``stop`` set ``xen_in_migration``, and while it is set
``xen_hvm_modified_memory`` tells the hypervisor about every page the device model itself
writes (``xendevicemodel_modified_memory``), so that migration copies it again.

Without a physmap entry for the framebuffer there is nothing to track and the sync does nothing,
as in QEMU.  A failing track call marks the whole range dirty, so the display redraws rather than
misses a change.  Pure apart from the hypercalls handed in (blocking, on the privcmd fd).
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from hypervisor_sim.protocol import HypercallError

log = logging.getLogger(__name__)

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT


class DirtyHypercalls(Protocol):
    def track_dirty_vram(self, domid: int, first_pfn: int, nr: int) -> bytes: ...

    def modified_memory(self, domid: int, first_pfn: int, nr: int) -> None: ...


def _bits(bitmap: bytes) -> list[int]:
    return [
        (i << 3) + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1
    ]


class DirtyVram:
    """The VGA client's dirty bits for the framebuffer of one domain."""

    def __init__(self, domid: int, hypercalls: DirtyHypercalls | None) -> None:
        self.domid = domid
        self._hc = hypercalls
        self.logging: tuple[int, int] | None = None  # (start_addr, size) while log is on
        self.in_migration = False
        self._dirty: set[int] = set()  # page indices from the framebuffer's start
        self.syncs = 0
        self.modified_calls = 0

    # ---------------------------------------------------------------- the memory listener

    def log_start(self, start_addr: int, size: int) -> None:
        """``xen_log_start``: the framebuffer region starts dirty logging; sync at once."""
        self.logging = (start_addr, size)
        self.sync()

    def log_stop(self) -> None:
        """``xen_log_stop``: ``xc_hvm_track_dirty_vram(domid, 0, 0)`` stops the tracking."""
        if self.logging is None:
            return
        self.logging = None
        if self._hc is None:
            return
        try:
            self._hc.track_dirty_vram(self.domid, 0, 0)
        except HypercallError as exc:
            log.warning("xen: track_dirty_vram stop: %s", exc)

    def log_global_start(self) -> None:
        """``xen_log_global_start``: migration has started (``xen_in_migration``)."""
        self.in_migration = True

    def log_global_stop(self) -> None:
        self.in_migration = False

    def sync(self) -> None:
        """``xen_sync_dirty_bitmap``: fold the hypervisor's bitmap into the VGA dirty bits."""
        if self.logging is None:
            return
        start_addr, size = self.logging
        npages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.syncs += 1
        try:
            if self._hc is None:
                raise HypercallError("ENODATA", "no dirty-VRAM tracking")
            bitmap = self._hc.track_dirty_vram(self.domid, start_addr >> PAGE_SHIFT, npages)
        except HypercallError as exc:
            # xen_sync_dirty_bitmap on -ENODATA: the whole region is dirty.
            log.warning("xen: track_dirty_vram: %s; whole framebuffer dirty", exc)
            self._dirty.update(range(npages))
            return
        self._dirty.update(i for i in _bits(bitmap) if i < npages)

    def modified_memory(self, start: int, length: int) -> None:
        """``xen_hvm_modified_memory``: the device model wrote ``[start, start+length)`` of a
        RAM block (a ram_addr, used as a pfn as QEMU does); only while migrating."""
        if not self.in_migration or length <= 0 or self._hc is None:
            return
        first = start >> PAGE_SHIFT
        nr = ((start + length - 1) >> PAGE_SHIFT) - first + 1
        self.modified_calls += 1
        try:
            self._hc.modified_memory(self.domid, first, nr)
        except HypercallError as exc:
            # QEMU reports and carries on; the frames may have moved away from the ram_addr.
            log.warning("xen: modified_memory(%#x, %d) failed: %s", first, nr, exc)

    # ---------------------------------------------------------------- for the display

    def get_and_clear(self) -> list[int]:
        """Sync, then the framebuffer pages (indices from its start) changed since the last
        call, and forget them (``memory_region_snapshot_and_clear_dirty`` for the VGA)."""
        self.sync()
        out = sorted(self._dirty)
        self._dirty.clear()
        return out

    def info(self) -> dict[str, object]:
        return {
            "logging": None if self.logging is None else list(self.logging),
            "in_migration": self.in_migration,
            "pending": len(self._dirty),
            "syncs": self.syncs,
            "modified_calls": self.modified_calls,
        }

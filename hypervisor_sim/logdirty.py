"""Log-dirty and dirty-VRAM tracking of a domain's memory, by page digest.

Xen tracks dirty pages by write-protecting the guest's p2m and logging the faults
(xen/arch/x86/mm/paging.c: ``paging_log_dirty_op``; HAP: ``hap_track_dirty_vram``).  Here the
guest's memory is a file that the guest actor writes with ``pwrite`` and any number of other
processes (device models, the toolstack) write through shared ``mmap`` mappings they may drop at
any time, and the kernel offers no soft-dirty bits.  So the tracker records a SHA-1 digest of
every page when the bitmap is cleaned and reports a page dirty when its digest differs at the
next look.  Whoever wrote and however, a write that changed a page cannot be missed; a write of
the bytes already there changes nothing a copy of the page could miss either.

One case needs the sender's help, and libxc-shaped senders give it: a page written after the
digest is taken, copied, then written back to its old bytes looks clean while the copy differs.
Each look returns the digests it recorded; a sender that hashes what it copied and finds another
value re-sends that page in the next round (toolstack/migrate.py).

Pages named by ``modified_memory`` (``xendevicemodel_modified_memory``) and pages whose p2m
entry appeared or went are dirty as well.  Pure and synchronous: the caller hands in digests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

#: ``XEN_DOMCTL_SHADOW_OP_*`` names accepted by ``shadow_op`` (xen/include/public/domctl.h).
SHADOW_OPS: Final = ("enable_logdirty", "peek", "clean", "off")


@dataclass
class DirtyLog:
    """What one look at the log found: ascending gfns and, for each, the digest recorded for it
    (``b""`` when the gfn is no longer populated)."""

    gfns: list[int]
    digests: list[bytes]


@dataclass
class DigestLog:
    """Dirty pages of a set of gfns since the last clean: digests plus forced marks."""

    baseline: dict[int, bytes]
    forced: set[int] = field(default_factory=set)

    def mark(self, gfns: Iterable[int]) -> None:
        """``paging_mark_pfn_dirty``: a writer told us (``modified_memory``)."""
        self.forced.update(gfns)

    def look(self, current: Mapping[int, bytes], *, clean: bool) -> DirtyLog:
        """Pages whose digest changed, that appeared or went, or were marked; ``clean`` makes
        ``current`` the new baseline and drops the marks (``SHADOW_OP_CLEAN``), otherwise the
        log is left as it was (``SHADOW_OP_PEEK``)."""
        dirty = {g for g, d in current.items() if self.baseline.get(g) != d}
        dirty.update(g for g in self.baseline if g not in current)
        dirty.update(self.forced)
        gfns = sorted(dirty)
        out = DirtyLog(gfns, [current.get(g, b"") for g in gfns])
        if clean:
            self.baseline = dict(current)
            self.forced.clear()
        return out


@dataclass
class VramTracker:
    """``HVMOP_track_dirty_vram`` state: one range per domain, as in Xen."""

    first_pfn: int
    nr: int
    log: DigestLog

    def covers(self, first_pfn: int, nr: int) -> bool:
        return (first_pfn, nr) == (self.first_pfn, self.nr)

    def bitmap(self, current: Mapping[int, bytes]) -> bytes:
        """Bit ``i`` (byte ``i // 8``, bit ``i % 8``) is page ``first_pfn + i``; cleans."""
        found = self.log.look(current, clean=True)
        return to_bitmap((g - self.first_pfn for g in found.gfns), self.nr)

    @staticmethod
    def start(first_pfn: int, nr: int) -> VramTracker:
        """A new range: every page reads dirty on the first call, as ``hap_track_dirty_vram``
        reports a fresh range (the display must draw it all once)."""
        log = DigestLog({})
        log.mark(range(first_pfn, first_pfn + nr))
        return VramTracker(first_pfn, nr, log)


def to_bitmap(indices: Iterable[int], nbits: int) -> bytes:
    """Little-endian bitmap of ``nbits`` bits, as Xen's ``dirty_bitmap`` handles are."""
    out = bytearray((nbits + 7) // 8)
    for i in indices:
        if 0 <= i < nbits:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def from_bitmap(bitmap: bytes, base: int = 0) -> list[int]:
    """The set bits of :func:`to_bitmap`'s output, offset by ``base``."""
    return [
        base + (i << 3) + b
        for i, byte in enumerate(bitmap)
        if byte
        for b in range(8)
        if byte >> b & 1
    ]

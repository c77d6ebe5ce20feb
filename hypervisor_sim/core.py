"""The hypervisor's pure core: domains, the p2m, frames, privcmd restriction and ioreq bookkeeping.

Synchronous and free of trio.  The trio shell (:mod:`hypervisor_sim.server`) feeds it hypercalls
with :meth:`Hypervisor.call` and drains :attr:`Hypervisor.effects`, the things that must happen
elsewhere as a consequence (wake an ioreq waiter, start or stop a guest actor), in the way h11
returns bytes instead of writing them.

Memory model (docs/architecture.md, "Run directory"): each domain's machine frames live in one
sparse file; the p2m maps gfn -> mfn (the page index in that file).  ``add_to_physmap`` with
``XENMAPSPACE_gmfn`` and ``relocate_memory`` move the p2m entry and never copy data, as
``xenmem_add_to_physmap_one`` does in Xen (xen/common/memory.c); a frame already at the
destination gfn is removed and freed first, as Xen does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from xenhost.rundir import guest_memory_name

from .frames import PAGE_SHIFT, PAGE_SIZE, FrameFile
from .logdirty import SHADOW_OPS, DigestLog, VramTracker
from .protocol import (
    DomainInfo,
    ForeignMap,
    HypercallError,
    IoreqDir,
    IoreqType,
    VersionInfo,
    check_args,
    ioreq_event,
)

XEN_VERSION: Final = "4.17"
#: Pages a domain may hold beyond ``max_pages``: the device model populates VRAM and ROMs on
#: top of guest RAM (docs/qemu-physmap.md, 'VRAM and the devices', ``xen_ram_alloc``); libxl adds
#: video memory to the domain's allowance in the same way.
EXTRA_PAGES: Final = 65536
#: gfns are below 2**40 (52-bit guest-physical addresses on x86).
GFN_LIMIT: Final = 1 << 40
#: One batch may name at most this many gfns (a frame of 16 MiB holds about 1.7 million).
MAX_BATCH: Final = 1 << 20


def all_ones(size: int) -> int:
    """What a read returns with nothing behind the address."""
    return (1 << (8 * size)) - 1


def map2_available(libs: str) -> bool:
    """``xenforeignmemory_map2`` exists from Xen 4.10 libraries on (docs/qemu-physmap.md, 'Sources
    and versions', 'XEN_COMPAT_PHYSMAP')."""
    try:
        major, minor = (int(p) for p in libs.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (4, 10)


# --------------------------------------------------------------------------------------------
# Effects for the shell


@dataclass(frozen=True, slots=True)
class IoreqDone:
    """Wake the guest access waiting on ``seq`` with ``value`` (all ones when abandoned)."""

    seq: int
    value: int


@dataclass(frozen=True, slots=True)
class DomainCreated:
    domid: int


@dataclass(frozen=True, slots=True)
class DomainDestroyed:
    domid: int


Effect = IoreqDone | DomainCreated | DomainDestroyed


# --------------------------------------------------------------------------------------------
# State


@dataclass
class Domain:
    domid: int
    name: str
    max_pages: int
    hvm: bool
    frames: FrameFile
    # XEN_DOMCTL_createdomain leaves a domain paused; the toolstack unpauses it when it is built.
    paused: bool = True
    p2m: dict[int, int] = field(default_factory=dict)
    #: Pinned cache attributes: (first gfn, last gfn, XEN_DOMCTL_MEM_CACHEATTR_*).
    pinned_cacheattr: list[tuple[int, int, int]] = field(default_factory=list)
    # XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY and HVMOP_track_dirty_vram state (logdirty.py).
    logdirty: DigestLog | None = None
    vram: VramTracker | None = None
    #: Time the vCPUs have run, in ns of the hypervisor's clock, up to ``running_since`` if
    #: unpaused (XEN_DOMCTL_getdomaininfo ``cpu_time``, what ``xl list`` shows as Time(s)).
    #: A simulated vCPU counts as running whenever its domain is unpaused.
    ran_ns: int = 0
    running_since: int | None = None

    def digests(self, gfns: Iterable[int] | None = None) -> dict[int, bytes]:
        """gfn -> SHA-1 of its frame, for the populated ones among ``gfns`` (default all)."""
        wanted = sorted(self.p2m) if gfns is None else [g for g in gfns if g in self.p2m]
        return dict(zip(wanted, self.frames.digests([self.p2m[g] for g in wanted]), strict=True))

    @property
    def tot_pages(self) -> int:
        return len(self.p2m)

    def set_paused(self, paused: bool, now: int) -> None:
        if self.running_since is not None:
            self.ran_ns += now - self.running_since
        self.running_since = None if paused else now
        self.paused = paused

    def info(self, now: int) -> DomainInfo:
        running = 0 if self.running_since is None else now - self.running_since
        return {
            "domid": self.domid,
            "name": self.name,
            "paused": self.paused,
            "tot_pages": self.tot_pages,
            "max_pages": self.max_pages,
            "hvm": self.hvm,
            "cpu_time": self.ran_ns + running,
        }

    def runs(self) -> list[list[int]]:
        """Populated gfns as ``[first_gfn, count]`` runs."""
        out: list[list[int]] = []
        for gfn in sorted(self.p2m):
            if out and out[-1][0] + out[-1][1] == gfn:
                out[-1][1] += 1
            else:
                out.append([gfn, 1])
        return out


@dataclass
class IoreqServer:
    id: int
    domid: int
    conn: int


@dataclass
class PendingIoreq:
    seq: int
    domid: int
    conn: int
    dir: IoreqDir
    size: int


@dataclass
class ConnState:
    # IOCTL_PRIVCMD_RESTRICT: once set, only this domain may be named (drivers/xen/privcmd.c).
    restricted_to: int | None = None


# Calls that name no domain and stay allowed on a restricted connection.
_UNTARGETED_OK: Final = frozenset({"version", "ioreq_complete", "restrict"})


class Hypervisor:
    """All domains and all connections' hypervisor-side state."""

    def __init__(
        self,
        mem_dir: str,
        xen_libs: str = XEN_VERSION,
        frame_file: Callable[[str], FrameFile] = FrameFile,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.mem_dir = mem_dir
        self.clock = clock
        self.xen_libs = xen_libs
        self._frame_file = frame_file
        self.domains: dict[int, Domain] = {}
        self.conns: dict[int, ConnState] = {}
        self.ioreq_servers: dict[int, IoreqServer] = {}  # by domid
        self.pending: dict[int, PendingIoreq] = {}  # by seq
        self.effects: list[Effect] = []
        self._next_domid = 1
        self._next_server_id = 1
        self._next_seq = 1

    # ---------------------------------------------------------------- connections

    def connect(self, conn: int) -> None:
        self.conns[conn] = ConnState()

    def disconnect(self, conn: int) -> None:
        """Forget a connection: its ioreq servers go, and their pending ioreqs complete as
        all ones so that no guest access waits for a device model that is gone."""
        self.conns.pop(conn, None)
        for domid in [d for d, s in self.ioreq_servers.items() if s.conn == conn]:
            del self.ioreq_servers[domid]
        self._abandon(lambda p: p.conn == conn)

    def take_effects(self) -> list[Effect]:
        out, self.effects = self.effects, []
        return out

    def _abandon(self, match: Callable[[PendingIoreq], bool]) -> None:
        for seq in [s for s, p in self.pending.items() if match(p)]:
            p = self.pending.pop(seq)
            self.effects.append(IoreqDone(seq, all_ones(p.size) if p.dir == "read" else 0))

    # ---------------------------------------------------------------- dispatch

    def call(self, conn: int, call: str, args: Mapping[str, Any]) -> Any:
        """Run one hypercall for ``conn``; raises :class:`HypercallError`."""
        check_args(call, args)
        self.check_target(conn, call, args.get("domid"))
        handler = self.HYPERCALLS.get(call)
        if handler is None:
            # guest and guest_driver run in the shell's guest actor.
            raise HypercallError("ENOSYS", f"{call} is not a synchronous call", call)
        try:
            return handler(self, conn, **args)
        except HypercallError as exc:
            if exc.call is not None:
                raise
            raise HypercallError(exc.errno_name, exc.message, call) from None

    def check_target(self, conn: int, call: str, domid: object) -> None:
        """EPERM when a restricted connection names another domain (or none)."""
        state = self.conns.get(conn)
        if state is None or state.restricted_to is None or call in _UNTARGETED_OK:
            return
        if domid != state.restricted_to:
            what = f"domain {domid}" if isinstance(domid, int) else "no single domain"
            raise HypercallError(
                "EPERM",
                f"connection is restricted to domain {state.restricted_to}; {call} names {what}",
                call,
            )

    def domain(self, domid: int) -> Domain:
        d = self.domains.get(domid)
        if d is None:
            raise HypercallError("ESRCH", f"no domain {domid}")
        return d

    # ---------------------------------------------------------------- domains

    def _call_version(self, conn: int) -> VersionInfo:
        return {
            "xen": XEN_VERSION,
            "libs": self.xen_libs,
            "has_map2": map2_available(self.xen_libs),
        }

    def _call_domain_create(
        self, conn: int, name: str, max_pages: int, hvm: bool = True
    ) -> dict[str, int]:
        if max_pages <= 0 or max_pages > GFN_LIMIT:
            raise HypercallError("EINVAL", f"max_pages {max_pages} out of range")
        domid = self._next_domid
        path = os.path.join(self.mem_dir, guest_memory_name(domid))
        frames = self._frame_file(path)
        self._next_domid += 1
        self.domains[domid] = Domain(domid, name, max_pages, hvm, frames)
        self.effects.append(DomainCreated(domid))
        return {"domid": domid}

    def _call_domain_destroy(self, conn: int, domid: int) -> None:
        d = self.domain(domid)
        del self.domains[domid]
        self.ioreq_servers.pop(domid, None)
        self._abandon(lambda p: p.domid == domid)
        d.frames.close()
        self.effects.append(DomainDestroyed(domid))

    def _call_domain_pause(self, conn: int, domid: int) -> None:
        self.domain(domid).set_paused(True, self.clock())

    def _call_domain_unpause(self, conn: int, domid: int) -> None:
        self.domain(domid).set_paused(False, self.clock())

    def _call_domain_getinfo(self, conn: int, domid: int) -> DomainInfo:
        return self.domain(domid).info(self.clock())

    def _call_domain_list(self, conn: int) -> list[DomainInfo]:
        now = self.clock()
        return [d.info(now) for _, d in sorted(self.domains.items())]

    def destroy_all(self) -> None:
        """Shut down: every domain goes and its frame file is removed."""
        for domid in list(self.domains):
            self._call_domain_destroy(0, domid)

    # ---------------------------------------------------------------- memory

    @staticmethod
    def _check_gfns(gfns: list[int]) -> None:
        if len(gfns) > MAX_BATCH:
            raise HypercallError("E2BIG", f"{len(gfns)} gfns in one call (at most {MAX_BATCH})")
        for gfn in gfns:
            if not 0 <= gfn < GFN_LIMIT:
                raise HypercallError("EINVAL", f"gfn {gfn:#x} out of range")

    def _call_populate_physmap(self, conn: int, domid: int, gfns: list[int]) -> int:
        d = self.domain(domid)
        self._check_gfns(gfns)
        seen: set[int] = set()
        for gfn in gfns:
            if gfn in d.p2m or gfn in seen:
                raise HypercallError("EEXIST", f"gfn {gfn:#x} is already populated")
            seen.add(gfn)
        limit = d.max_pages + EXTRA_PAGES
        if d.tot_pages + len(gfns) > limit:
            raise HypercallError(
                "ENOMEM",
                f"domain {domid} would hold {d.tot_pages + len(gfns)} pages (limit {limit})",
            )
        d.p2m.update(zip(gfns, d.frames.alloc_many(len(gfns)), strict=True))
        return len(gfns)

    def _call_decrease_reservation(self, conn: int, domid: int, gfns: list[int]) -> int:
        d = self.domain(domid)
        self._check_gfns(gfns)
        freed = [mfn for mfn in (d.p2m.pop(gfn, None) for gfn in gfns) if mfn is not None]
        d.frames.free_many(freed)
        return len(freed)

    def _move(self, d: Domain, idx: int, gpfn: int) -> None:
        # xenmem_add_to_physmap_one, XENMAPSPACE_gmfn: the frame keeps its contents.
        for gfn in (idx, gpfn):
            if not 0 <= gfn < GFN_LIMIT:
                raise HypercallError("EINVAL", f"gfn {gfn:#x} out of range")
        if idx not in d.p2m:
            raise HypercallError("EINVAL", f"gfn {idx:#x} is not populated")
        if idx == gpfn:
            return
        old = d.p2m.pop(gpfn, None)
        if old is not None:
            d.frames.free(old)
        d.p2m[gpfn] = d.p2m.pop(idx)

    def _call_add_to_physmap(self, conn: int, domid: int, space: str, idx: int, gpfn: int) -> None:
        d = self.domain(domid)
        if space != "gmfn":
            raise HypercallError("EOPNOTSUPP", f"space {space!r} (only 'gmfn' is modelled)")
        self._move(d, idx, gpfn)

    def _call_relocate_memory(
        self, conn: int, domid: int, src_gfn: int, dst_gfn: int, nr: int
    ) -> None:
        # xendevicemodel_relocate_memory: XENMAPSPACE_gmfn_range, ascending gfn order.
        d = self.domain(domid)
        if not 0 <= nr <= MAX_BATCH:
            raise HypercallError("EINVAL", f"nr {nr} out of range")
        for i in range(nr):
            try:
                self._move(d, src_gfn + i, dst_gfn + i)
            except HypercallError as exc:
                raise HypercallError(exc.errno_name, f"{exc.message} ({i} of {nr} moved)") from None

    def _call_p2m(self, conn: int, domid: int) -> list[list[int]]:
        return self.domain(domid).runs()

    def _call_map_foreign(self, conn: int, domid: int, gfns: list[int]) -> ForeignMap:
        d = self.domain(domid)
        self._check_gfns(gfns)
        offsets: list[int] = []
        errors: list[str] = []
        for gfn in gfns:
            mfn = d.p2m.get(gfn)
            offsets.append(-1 if mfn is None else mfn * PAGE_SIZE)
            # An unpopulated gfn fails get_page_from_l1e in mod_l1_entry (xen/arch/x86/mm.c):
            # EINVAL.  ENOENT is kept for paged-out frames, which this hypervisor never has.
            errors.append("EINVAL" if mfn is None else "")
        return {"mem_path": d.frames.path, "offsets": offsets, "errors": errors}

    def _call_pin_memory_cacheattr(
        self, conn: int, domid: int, start: int, end: int, type: int
    ) -> None:
        # XEN_DOMCTL_pin_mem_cacheattr (xc_domain_pin_memory_cacheattr in QEMU 2.10,
        # xendevicemodel_pin_memory_cacheattr later): remembered, no effect on memory here.
        d = self.domain(domid)
        if not 0 <= start <= end < GFN_LIMIT:
            raise HypercallError("EINVAL", f"cache attribute range {start:#x}-{end:#x}")
        d.pinned_cacheattr.append((start, end, type))

    def _call_restrict(self, conn: int, domid: int) -> None:
        state = self.conns.setdefault(conn, ConnState())
        if state.restricted_to is not None and state.restricted_to != domid:
            # privcmd_ioctl_restrict: a second, different domid is -EINVAL.
            raise HypercallError(
                "EINVAL", f"connection is already restricted to domain {state.restricted_to}"
            )
        state.restricted_to = domid

    # ---------------------------------------------------------------- log-dirty

    def _call_shadow_op(self, conn: int, domid: int, op: str) -> dict[str, Any] | None:
        """``xc_shadow_control``: cf. xen/arch/x86/mm/paging.c ``paging_log_dirty_op``.
        ``peek`` and ``clean`` return ``{"pages": [gfn], "digests": [bytes], "dirty_count"}``;
        ``enable_logdirty`` the same shape for every populated gfn."""
        d = self.domain(domid)
        if op not in SHADOW_OPS:
            raise HypercallError("EINVAL", f"op {op!r} (one of {', '.join(SHADOW_OPS)})")
        if op == "enable_logdirty":
            if d.logdirty is not None:
                # paging_log_dirty_enable: already in log-dirty mode is -EINVAL.
                raise HypercallError("EINVAL", f"domain {domid} is already in log-dirty mode")
            # The first round of a live save sends every page: the reply lists them all, with
            # the digests the log starts from.
            current = d.digests()
            d.logdirty = DigestLog(current)
            return {"pages": list(current), "digests": list(current.values()), "dirty_count": 0}
        if d.logdirty is None:
            raise HypercallError("EINVAL", f"domain {domid} is not in log-dirty mode")
        if op == "off":
            d.logdirty = None
            return None
        found = d.logdirty.look(d.digests(), clean=op == "clean")
        return {"pages": found.gfns, "digests": found.digests, "dirty_count": len(found.gfns)}

    def _call_track_dirty_vram(
        self, conn: int, domid: int, first_pfn: int, nr: int
    ) -> dict[str, bytes]:
        """``HVMOP_track_dirty_vram``: the pages of the range changed since the last call; a
        new range reads all dirty once; ``nr == 0`` stops tracking."""
        d = self.domain(domid)
        if nr == 0:
            d.vram = None
            return {"bitmap": b""}
        if not 0 < nr <= MAX_BATCH or not 0 <= first_pfn < GFN_LIMIT - nr:
            raise HypercallError("EINVAL", f"range {first_pfn:#x}+{nr} out of range")
        if d.vram is None or not d.vram.covers(first_pfn, nr):
            d.vram = VramTracker.start(first_pfn, nr)
        current = d.digests(range(first_pfn, first_pfn + nr))
        return {"bitmap": d.vram.bitmap(current)}

    def _call_modified_memory(self, conn: int, domid: int, first_pfn: int, nr: int) -> None:
        """``xendevicemodel_modified_memory``: mark pages dirty for log-dirty and dirty VRAM;
        a no-op when neither is on, as ``dm_op`` modified_memory is."""
        d = self.domain(domid)
        if not 0 <= nr <= MAX_BATCH or not 0 <= first_pfn < GFN_LIMIT - nr:
            raise HypercallError("EINVAL", f"range {first_pfn:#x}+{nr} out of range")
        gfns = range(first_pfn, first_pfn + nr)
        unpopulated = [g for g in gfns if g not in d.p2m]
        if unpopulated:
            # dm_op modified_memory fails on a gfn with no RAM behind it.
            raise HypercallError("EINVAL", f"gfn {unpopulated[0]:#x} is not populated")
        for log in (d.logdirty, d.vram.log if d.vram else None):
            if log is not None:
                log.mark(gfns)

    # ---------------------------------------------------------------- ioreq servers

    def _call_ioreq_server_create(self, conn: int, domid: int) -> dict[str, int]:
        self.domain(domid)
        cur = self.ioreq_servers.get(domid)
        if cur is not None:
            raise HypercallError(
                "EEXIST", f"domain {domid} already has ioreq server {cur.id} (one per domain)"
            )
        sid = self._next_server_id
        self._next_server_id += 1
        self.ioreq_servers[domid] = IoreqServer(sid, domid, conn)
        return {"id": sid}

    def _call_ioreq_server_destroy(self, conn: int, domid: int, id: int) -> None:
        self.domain(domid)
        cur = self.ioreq_servers.get(domid)
        if cur is None or cur.id != id:
            raise HypercallError("ENOENT", f"domain {domid} has no ioreq server {id}")
        if cur.conn != conn:
            raise HypercallError("EPERM", f"ioreq server {id} belongs to another connection")
        del self.ioreq_servers[domid]
        self._abandon(lambda p: p.domid == domid)

    def _call_ioreq_complete(self, conn: int, seq: int, data: int = 0) -> None:
        p = self.pending.get(seq)
        if p is None or p.conn != conn:
            raise HypercallError("ENOENT", f"no pending ioreq {seq} on this connection")
        del self.pending[seq]
        value = data & all_ones(p.size) if p.dir == "read" else 0
        self.effects.append(IoreqDone(seq, value))

    def ioreq_send(
        self, domid: int, type: IoreqType, dir: IoreqDir, addr: int, size: int, data: int
    ) -> tuple[int, dict[str, Any]] | None:
        """Start an ioreq for a guest access: ``(conn, event)`` to deliver, or ``None`` when
        the domain has no ioreq server (reads then see all ones, writes are dropped)."""
        server = self.ioreq_servers.get(domid)
        if server is None:
            return None
        seq = self._next_seq
        self._next_seq += 1
        self.pending[seq] = PendingIoreq(seq, domid, server.conn, dir, size)
        data = data & all_ones(size) if dir == "write" else 0
        return server.conn, ioreq_event(seq, domid, type, dir, addr, size, data)

    def has_ioreq_server(self, domid: int) -> bool:
        return domid in self.ioreq_servers

    # ---------------------------------------------------------------- the hypercall table

    #: Every synchronous hypercall by name (``guest`` and ``guest_driver`` run in the shell's
    #: guest actor); cf. Xen's hypercall_table in xen/arch/x86/hypercall.c.
    HYPERCALLS: ClassVar[Mapping[str, Callable[..., Any]]] = {
        "version": _call_version,
        "domain_create": _call_domain_create,
        "domain_destroy": _call_domain_destroy,
        "domain_pause": _call_domain_pause,
        "domain_unpause": _call_domain_unpause,
        "domain_getinfo": _call_domain_getinfo,
        "domain_list": _call_domain_list,
        "populate_physmap": _call_populate_physmap,
        "decrease_reservation": _call_decrease_reservation,
        "add_to_physmap": _call_add_to_physmap,
        "relocate_memory": _call_relocate_memory,
        "p2m": _call_p2m,
        "map_foreign": _call_map_foreign,
        "pin_memory_cacheattr": _call_pin_memory_cacheattr,
        "restrict": _call_restrict,
        "shadow_op": _call_shadow_op,
        "track_dirty_vram": _call_track_dirty_vram,
        "modified_memory": _call_modified_memory,
        "ioreq_server_create": _call_ioreq_server_create,
        "ioreq_server_destroy": _call_ioreq_server_destroy,
        "ioreq_complete": _call_ioreq_complete,
    }

    # ---------------------------------------------------------------- guest memory

    def segments(self, domid: int, gpa: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """Split ``[gpa, gpa+length)`` at page boundaries: ``(gpa, length, mfn or None)``, with
        adjacent pieces of the same kind (RAM or not) kept apart per page."""
        d = self.domain(domid)
        if gpa < 0 or length < 0 or (gpa + length) >> PAGE_SHIFT > GFN_LIMIT:
            raise HypercallError("EINVAL", f"range {gpa:#x}+{length:#x} out of range")
        end = gpa + length
        while gpa < end:
            n = min(end, ((gpa >> PAGE_SHIFT) + 1) << PAGE_SHIFT) - gpa
            yield gpa, n, d.p2m.get(gpa >> PAGE_SHIFT)
            gpa += n

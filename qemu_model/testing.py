"""Stand-ins for the hypervisor and xenstore at the pure layer, in the manner of trio.testing.

:class:`FakeHypervisor` keeps a domain's frames in a real temporary file and a p2m in a dict,
and answers ``map_foreign`` the way hypervisor-sim does (file offset per gfn), so the real
:class:`~qemu_model.xenforeignmemory.ForeignMemory` makes real mmaps over it.
:class:`FakeXenStore` is a flat dict with the device model's blocking xenstore interface.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 4096


class FakeHypervisor:
    """One or more domains' p2m over one frame file."""

    def __init__(self) -> None:
        fd, self.mem_path = tempfile.mkstemp(prefix="physmap-lab-frames-")
        os.close(fd)
        self._fd = os.open(self.mem_path, os.O_RDWR | os.O_CLOEXEC)
        self._nframes = 0
        self.p2m: dict[tuple[int, int], int] = {}  # (domid, gfn) -> frame
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_relocate = False
        self.restricted_to: int | None = None
        self.restricted_handles: list[str] = []

    def close(self) -> None:
        os.close(self._fd)
        os.unlink(self.mem_path)

    # Hypercalls the device model makes.

    def populate_physmap(self, domid: int, gfns: list[int]) -> int:
        self.calls.append(("populate_physmap", {"domid": domid, "nr": len(gfns)}))
        for gfn in gfns:
            if (domid, gfn) in self.p2m:
                raise OSError(f"EEXIST: gfn {gfn:#x}")
        for gfn in gfns:
            self.p2m[domid, gfn] = self._alloc()
        return len(gfns)

    def relocate_memory(self, domid: int, src_gfn: int, dst_gfn: int, nr: int) -> None:
        self.calls.append(
            ("relocate_memory", {"domid": domid, "src_gfn": src_gfn, "dst_gfn": dst_gfn, "nr": nr})
        )
        if self.fail_relocate:
            raise OSError("EINVAL: relocation refused")
        frames = [self.p2m.pop((domid, src_gfn + i)) for i in range(nr)]
        for i, frame in enumerate(frames):
            self.p2m[domid, dst_gfn + i] = frame

    def add_to_physmap(self, domid: int, space: str, idx: int, gpfn: int) -> None:
        """XENMAPSPACE_gmfn: move one frame; EINVAL when ``idx`` holds none (xen/common/memory.c)."""
        self.calls.append(("add_to_physmap", {"domid": domid, "idx": idx, "gpfn": gpfn}))
        if self.fail_relocate or (domid, idx) not in self.p2m:
            raise OSError(f"EINVAL: add_to_physmap {idx:#x} -> {gpfn:#x}")
        self.p2m[domid, gpfn] = self.p2m.pop((domid, idx))

    def add_to_physmap_each(self, domid: int, space: str, moves: list[tuple[int, int]]) -> None:
        for idx, gpfn in moves:
            self.add_to_physmap(domid, space, idx, gpfn)

    def pin_memory_cacheattr(self, domid: int, start: int, end: int, type: int) -> None:
        self.calls.append(
            ("pin_memory_cacheattr", {"domid": domid, "start": start, "end": end, "type": type})
        )

    def map_foreign(self, domid: int, gfns: list[int]) -> dict[str, Any]:
        self.calls.append(("map_foreign", {"domid": domid, "first": gfns[0], "nr": len(gfns)}))
        offsets, errors = [], []
        for gfn in gfns:
            frame = self.p2m.get((domid, gfn))
            offsets.append(-1 if frame is None else frame * PAGE_SIZE)
            errors.append("EINVAL" if frame is None else "")
        return {"mem_path": self.mem_path, "offsets": offsets, "errors": errors}

    def restrict(self, domid: int) -> int:
        self.restricted_to = domid
        return 0

    # The handles xen_restrict restricts (qemu_model.xen_native.RestrictableHandles).

    def restrict_devicemodel(self, domid: int) -> int:
        self.restricted_handles.append("devicemodel")
        return self.restrict(domid)

    def restrict_foreignmemory(self, domid: int) -> int:
        self.restricted_handles.append("foreignmemory")
        return self.restrict(domid)

    def restrict_all(self, domid: int) -> int:
        self.restricted_handles.append("all")
        return self.restrict(domid)

    # The guest's view.

    def write_gfn(self, domid: int, gfn: int, data: bytes, offset: int = 0) -> None:
        os.pwrite(self._fd, data, self.p2m[domid, gfn] * PAGE_SIZE + offset)

    def write(self, domid: int, gpa: int, data: bytes) -> None:
        while data:
            n = min(len(data), PAGE_SIZE - gpa % PAGE_SIZE)
            self.write_gfn(domid, gpa // PAGE_SIZE, data[:n], gpa % PAGE_SIZE)
            gpa, data = gpa + n, data[n:]

    def read(self, domid: int, gpa: int, length: int) -> bytes:
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - gpa % PAGE_SIZE)
            frame = self.p2m[domid, gpa // PAGE_SIZE]
            out += os.pread(self._fd, n, frame * PAGE_SIZE + gpa % PAGE_SIZE)
            gpa, length = gpa + n, length - n
        return bytes(out)

    def copy_domain(self, src: int, dst: int) -> None:
        """What the toolstack does on save/restore: same gfns, same bytes, new frames."""
        for (domid, gfn), frame in sorted(self.p2m.items()):
            if domid != src:
                continue
            new = self._alloc()
            self.p2m[dst, gfn] = new
            os.pwrite(self._fd, os.pread(self._fd, PAGE_SIZE, frame * PAGE_SIZE), new * PAGE_SIZE)

    def _alloc(self) -> int:
        frame = self._nframes
        self._nframes += 1
        os.ftruncate(self._fd, self._nframes * PAGE_SIZE)
        return frame


@dataclass
class FakeXenStore:
    """A flat store with the blocking interface of :class:`qemu_model.xen_hvm.XenStore`."""

    nodes: dict[str, str] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False

    def read(self, path: str) -> str | None:
        self.log.append(("read", path))
        return None if self.closed else self.nodes.get(path)

    def write(self, path: str, value: str) -> bool:
        self.log.append(("write", path))
        if self.closed:
            return False
        self.nodes[path] = value
        return True

    def directory(self, path: str) -> list[str] | None:
        self.log.append(("directory", path))
        if self.closed:
            return None
        prefix = path.rstrip("/") + "/"
        children = {p[len(prefix) :].split("/")[0] for p in self.nodes if p.startswith(prefix)}
        return sorted(children) if children else None

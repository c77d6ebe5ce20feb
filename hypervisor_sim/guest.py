"""The scriptable guest: one vCPU actor per domain (docs/architecture.md, "The scriptable guest").

A ``guest`` hypercall hands the actor a batch of generic ops; it runs them in order, one batch
at a time, and stops at the first failing op.  Every access goes through the p2m as a vCPU's
would: a populated gfn is RAM (read and written in the domain's frame file), anything else is
emulated, so it becomes an ioreq to the domain's ioreq server and the access waits for
``ioreq_complete`` (Xen's hvmemul path, xen/arch/x86/hvm/emulate.c).  Port I/O and PCI config
accesses are always ioreqs.  With no ioreq server, reads see all ones and writes are dropped.
Memory ops over unpopulated gfns are split into naturally aligned accesses of at most 8 bytes.

A paused domain's vCPU does not run.  Rather than leave the caller blocked until an unpause,
ops on a paused domain fail at once with ``EBUSY`` (checked before each op, so a pause in the
middle of a batch stops it there).  Domains start paused (``XEN_DOMCTL_createdomain``); the
toolstack unpauses them.

xenstore ops use the domain's guest socket, ``RUNDIR/domains/<domid>.sock``, opened on the
first ``xs_*`` op and kept for the domain's life.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from .core import Hypervisor, all_ones
from .guest_drivers import pattern_bytes
from .protocol import HypercallError, IoreqDir, IoreqType, pci_config_addr

#: Largest ``mem_read``: the reply must fit a frame.
MAX_READ: Final = 8 * 1024 * 1024
#: Largest ``mem_write``/``mem_fill``/``mem_sha256`` range.
MAX_RANGE: Final = 512 * 1024 * 1024

IoreqFn = Callable[[int, IoreqType, IoreqDir, int, int, int], Awaitable[int]]
AuditFn = Callable[[int, str, str], None]


class XenstoreConnection(Protocol):
    async def read(self, path: str) -> Any: ...
    async def write(self, path: str, value: Any) -> Any: ...
    async def directory(self, path: str) -> Any: ...
    async def rm(self, path: str) -> Any: ...


@dataclass
class _Job:
    ops: list[Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: list[Any] | None = None
    error: HypercallError | None = None


def _field(op: Mapping[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    v = op.get(name, default)
    if v is ...:
        raise HypercallError("EINVAL", f"missing field {name!r}")
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise HypercallError("EINVAL", f"field {name!r} must be {kind.__name__}")
    return v


def _size(op: Mapping[str, Any], allowed: tuple[int, ...]) -> int:
    size: int = _field(op, "size", int)
    if size not in allowed:
        raise HypercallError("EINVAL", f"size {size} (allowed: {', '.join(map(str, allowed))})")
    return size


def _nonneg(op: Mapping[str, Any], name: str, limit: int) -> int:
    v: int = _field(op, name, int)
    if not 0 <= v < limit:
        raise HypercallError("EINVAL", f"{name} {v:#x} out of range")
    return v


class Guest:
    """The vCPU actor of one domain; :meth:`run` lives in the server's nursery."""

    def __init__(
        self,
        core: Hypervisor,
        domid: int,
        ioreq: IoreqFn,
        xs_path: str,
        audit: AuditFn | None = None,
    ) -> None:
        self.core = core
        self.domid = domid
        self._ioreq = ioreq
        self._xs_path = xs_path
        self._audit = audit
        self._send, self._recv = trio.open_memory_channel[_Job](math.inf)
        self._cancel = trio.CancelScope()
        self._xs: XenstoreConnection | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._xs_stack: contextlib.AsyncExitStack | None = None

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The xenstore connection (a client with a nursery of its own) is entered into the
        # exit stack from inside the cancel scope, so the stack must close inside it too:
        # scopes nest, the connection's closes before the vCPU's.
        try:
            with self._cancel:
                async with contextlib.AsyncExitStack() as stack:
                    self._stack = stack
                    task_status.started()
                    async for job in self._recv:
                        await self._run_job(job)
        finally:
            self._stack = self._xs_stack = None
            self._xs = None
            self._recv.close()
            while True:
                try:
                    job = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                    break
                self._fail(job, HypercallError("ESRCH", f"domain {self.domid} is gone"))

    def stop(self) -> None:
        """The domain is destroyed: the vCPU stops, waiting batches fail with ESRCH."""
        self._cancel.cancel()
        self._send.close()

    @staticmethod
    def _fail(job: _Job, error: HypercallError) -> None:
        if not job.done.is_set():
            job.error = error
            job.done.set()

    async def submit(self, ops: list[Any]) -> list[Any]:
        """Run a batch of ops and return their results; raises :class:`HypercallError`."""
        self._check_running()
        job = _Job(ops)
        try:
            self._send.send_nowait(job)
        except trio.ClosedResourceError:
            raise HypercallError("ESRCH", f"domain {self.domid} is gone") from None
        await job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _check_running(self) -> None:
        d = self.core.domains.get(self.domid)
        if d is None:
            raise HypercallError("ESRCH", f"domain {self.domid} is gone")
        if d.paused:
            raise HypercallError("EBUSY", f"domain {self.domid} is paused: its vCPU does not run")

    async def _run_job(self, job: _Job) -> None:
        results: list[Any] = []
        try:
            for i, op in enumerate(job.ops):
                name = op.get("op") if isinstance(op, dict) else None
                label = f"ops[{i}] {name}" if isinstance(name, str) else f"ops[{i}]"
                try:
                    self._check_running()
                    if not isinstance(op, dict) or not isinstance(name, str):
                        raise HypercallError("EINVAL", 'an op must be a map with a string "op"')
                    results.append(await self._run_op(name, op))
                except HypercallError as exc:
                    self._log(name, exc.errno_name)
                    job.error = HypercallError(exc.errno_name, f"{label}: {exc.message}", "guest")
                    job.done.set()
                    return
                self._log(name, "ok")
            job.result = results
            job.done.set()
        finally:
            self._fail(job, HypercallError("ESRCH", f"domain {self.domid} is gone"))

    def _log(self, name: object, result: str) -> None:
        if self._audit is not None:
            self._audit(self.domid, str(name), result)

    # ---------------------------------------------------------------- ops

    async def _run_op(self, name: str, op: Mapping[str, Any]) -> Any:
        if name in ("pci_cfg_write", "pci_cfg_read"):
            sbdf = _nonneg(op, "sbdf", 1 << 32)
            reg = _nonneg(op, "reg", 4096)
            size = _size(op, (1, 2, 4))
            addr = pci_config_addr(sbdf, reg)
            if name == "pci_cfg_read":
                return await self._ioreq(self.domid, "pci_config", "read", addr, size, 0)
            await self._ioreq(
                self.domid, "pci_config", "write", addr, size, _field(op, "value", int)
            )
            return None
        if name in ("pio_write", "pio_read"):
            port = _nonneg(op, "port", 1 << 16)
            size = _size(op, (1, 2, 4))
            if name == "pio_read":
                return await self._ioreq(self.domid, "pio", "read", port, size, 0)
            await self._ioreq(self.domid, "pio", "write", port, size, _field(op, "value", int))
            return None
        if name in ("mmio_write", "mmio_read"):
            gpa = _nonneg(op, "gpa", 1 << 52)
            size = _size(op, (1, 2, 4, 8))
            if name == "mmio_read":
                return int.from_bytes(await self.read_mem(gpa, size), "little")
            value = _field(op, "value", int) & all_ones(size)
            await self.write_mem(gpa, value.to_bytes(size, "little"))
            return None
        if name == "mem_write":
            gpa = _nonneg(op, "gpa", 1 << 52)
            data = _field(op, "data", bytes)
            if len(data) > MAX_RANGE:
                raise HypercallError("E2BIG", f"{len(data)} bytes (at most {MAX_RANGE})")
            await self.write_mem(gpa, data)
            return None
        if name == "mem_read":
            gpa = _nonneg(op, "gpa", 1 << 52)
            n = _nonneg(op, "len", MAX_READ + 1)
            return await self.read_mem(gpa, n)
        if name == "mem_fill":
            gpa = _nonneg(op, "gpa", 1 << 52)
            n = _nonneg(op, "len", MAX_RANGE + 1)
            seed = _field(op, "seed", int)
            await self.write_mem(gpa, pattern_bytes(seed, n))
            return None
        if name == "mem_sha256":
            gpa = _nonneg(op, "gpa", 1 << 52)
            n = _nonneg(op, "len", MAX_RANGE + 1)
            return hashlib.sha256(await self.read_mem(gpa, n)).hexdigest()
        if name in ("xs_read", "xs_write", "xs_directory", "xs_rm"):
            return await self._xs_op(name, op)
        raise HypercallError("EINVAL", f"unknown op {name!r}")

    async def _access(self, gpa: int, size: int, dir: IoreqDir, data: int) -> int:
        return await self._ioreq(self.domid, "copy", dir, gpa, size, data)

    @staticmethod
    def _chunks(gpa: int, n: int) -> list[tuple[int, int]]:
        # Naturally aligned accesses of 8, 4, 2 or 1 bytes.
        out: list[tuple[int, int]] = []
        end = gpa + n
        while gpa < end:
            size = 8
            while size > 1 and (gpa % size or gpa + size > end):
                size //= 2
            out.append((gpa, size))
            gpa += size
        return out

    async def read_mem(self, gpa: int, n: int) -> bytes:
        d = self.core.domain(self.domid)
        out = bytearray()
        for seg_gpa, seg_n, mfn in list(self.core.segments(self.domid, gpa, n)):
            if mfn is not None:
                out += d.frames.read(mfn, seg_gpa & 0xFFF, seg_n)
            elif not self.core.has_ioreq_server(self.domid):
                out += b"\xff" * seg_n
            else:
                for a, size in self._chunks(seg_gpa, seg_n):
                    out += (await self._access(a, size, "read", 0)).to_bytes(size, "little")
        return bytes(out)

    async def write_mem(self, gpa: int, data: bytes) -> None:
        d = self.core.domain(self.domid)
        pos = 0
        for seg_gpa, seg_n, mfn in list(self.core.segments(self.domid, gpa, len(data))):
            piece = data[pos : pos + seg_n]
            pos += seg_n
            if mfn is not None:
                d.frames.write(mfn, seg_gpa & 0xFFF, piece)
            elif self.core.has_ioreq_server(self.domid):
                for a, size in self._chunks(seg_gpa, seg_n):
                    value = int.from_bytes(piece[a - seg_gpa : a - seg_gpa + size], "little")
                    await self._access(a, size, "write", value)

    async def _xs_op(self, name: str, op: Mapping[str, Any]) -> Any:
        """One xenstore op on the domain's connection.  A connection the daemon dropped (it
        was restarted on its state directory) is opened again once: a real guest's ring
        outlives a xenstored restart, the new daemon maps it again."""
        from xenstored_sim.wire import XsError

        path = _field(op, "path", str)
        value = op.get("value")
        if name == "xs_write" and not isinstance(value, str | bytes):
            raise HypercallError("EINVAL", "field 'value' must be str or bytes")
        for attempt in (1, 2):
            xs = await self._xenstore()
            try:
                if name == "xs_read":
                    return await xs.read(path)
                if name == "xs_write":
                    await xs.write(path, value)
                    return None
                if name == "xs_directory":
                    return await xs.directory(path)
                await xs.rm(path)
                return None
            except XsError as exc:
                raise HypercallError(exc.errno_name, f"xenstore {path}: {exc}") from None
            except (OSError, trio.ClosedResourceError) as exc:  # XsDisconnected: an OSError
                await self._close_xenstore()
                if attempt == 2:
                    raise HypercallError("EIO", f"xenstore connection failed: {exc}") from None
        raise AssertionError("unreachable")

    async def _close_xenstore(self) -> None:
        self._xs = None
        if self._xs_stack is not None:
            stack, self._xs_stack = self._xs_stack, None
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _xenstore(self) -> XenstoreConnection:
        if self._xs is not None:
            return self._xs
        from xenstored_sim.client import open_xenstore

        assert self._stack is not None
        # Its own exit stack, closed on a reconnect, inside the actor's (closed at the end).
        conn = await self._stack.enter_async_context(contextlib.AsyncExitStack())
        try:
            xs: XenstoreConnection = await conn.enter_async_context(open_xenstore(self._xs_path))
        except OSError as exc:
            raise HypercallError(
                "ENOENT", f"no xenstore guest socket at {self._xs_path}: {exc}"
            ) from None
        self._xs, self._xs_stack = xs, conn
        return xs

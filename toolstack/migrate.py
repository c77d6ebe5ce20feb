"""Live migration: ``xl migrate`` and ``xl migrate-receive`` over TCP (tools/xl/xl_migrate.c).

The sender writes the same stream a save writes (toolstack/image.py: the xl header, the libxl
stream v2 with the libxc stream inside), but live, as libxc's ``send_memory_live``
(tools/libs/guest/xg_sr_save.c) does: log-dirty on, a first round with every page, then rounds
of the pages dirtied meanwhile until few are left or the round limit is hit; then the domain is
suspended (guest paused, QMP ``stop``, ``xen-save-devices-state`` with ``live``), the last
round goes out, log-dirty goes off, and the records of libxl_stream_write.c follow:
libxc END, ``EMULATOR_XENSTORE_DATA`` (the physmap keys, libxl flavour with keys only),
``EMULATOR_CONTEXT`` and END.  Around the rounds the device model's global dirty log is on
(``xen-set-global-dirty-log``, as libxl_dom_save.c switches it).

The receiver spools the stream to a file in its run directory.  As ``xl migrate-receive``
does, it builds the domain once the configuration is in and loads each PAGE_DATA record as it
arrives (libxc's restore), so that the pre-copy rounds are in place when the sender suspends;
at END it checks the whole stream and restores the rest paused as ``xl restore`` does (the
compat keys are planted in *its* xenstore before its device model starts), reports, and
unpauses once the sender gives permission; the sender then destroys its copy.  On any failure
before that permission the source domain resumes and the receiver removes what it built.

Log-dirty reports pages by content digest (hypervisor_sim/logdirty.py); each page sent is
hashed and compared with the digest of its look, and one that differs goes again next round.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import trio

from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected

from . import memory_stream, savefile, stream
from .config import DomainConfig
from .emulator_xenstore import XenstoreDataError, encode
from .flavours import flavour
from .libxl import Libxl, ToolstackError
from .libxl.results import Clock
from .libxl.stream_read import Incoming
from .memory_stream import BATCH_PAGES, PAGE_SIZE, coalesce
from .migration_stream import (
    FINAL_REPORT,
    PERMISSION_TO_GO,
    RECEIVER_BANNER,
    RECEIVER_REPORT,
    StreamFollower,
)
from .qmp import QmpError, QmpProtocolError
from .stream import RecordType
from .streamio import ImageReader, StreamError

#: libxc's defaults (xg_sr_save.c): at most 5 rounds, stop once 50 or fewer pages are dirty.
MAX_ROUNDS: Final = 5
DIRTY_THRESHOLD: Final = 50
_RECV_CHUNK: Final = 1 << 20
#: How long the receiver waits for its guard to go once told ``done``.
_GUARD_EXIT_S: Final = 10.0


def parse_host(text: str) -> tuple[str, int]:
    """``address:port`` of a receiver; ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"host {text!r} is not ADDRESS:PORT")
    return host.strip("[]"), int(port)


@dataclass
class MigrateResult:
    domid: int
    destination: str
    precopy_rounds: int
    pages_sent: int
    pages_per_round: list[int] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    xenstore_keys: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    downtime_s: float = 0.0
    total_s: float = 0.0
    #: The downtime by step: ``suspend`` (pause, QMP stop, device state saved), ``final_look``
    #: (log-dirty's last CLEAN), ``last_round`` (its pages sent, log-dirty off), ``tail`` (the keys in compat mode, the device
    #: state and END sent), ``destination`` (until the receiver reports the domain restored)
    #: and ``handover`` (permission to go until the receiver's final report).
    stop_copy_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Channel:
    """The sender's or receiver's end: exact reads, counted writes."""

    def __init__(self, s: trio.abc.Stream) -> None:
        self.s = s
        self.sent = 0

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await self.s.send_all(data)

    async def receive_some(self, n: int) -> bytes:
        return bytes(await self.s.receive_some(n))

    async def expect(self, message: bytes, what: str) -> int:
        """Read ``message`` and the status byte after a report; the status (0 = ok)."""
        want = len(message) + (0 if message in (RECEIVER_BANNER, PERMISSION_TO_GO) else 1)
        got = bytearray()
        while len(got) < want:
            data = await self.receive_some(want - len(got))
            if not data:
                raise ToolstackError(f"the other end closed the connection before {what}")
            got += data
        if bytes(got[: len(message)]) != message:
            raise ToolstackError(f"unexpected data from the other end instead of {what}")
        return got[len(message)] if want > len(message) else 0


# --------------------------------------------------------------------------------------------
# The sender


class _Sender:
    def __init__(self, lx: Libxl, domid: int, ch: _Channel, result: MigrateResult) -> None:
        self.lx, self.domid, self.ch, self.result = lx, domid, ch, result
        self.resend: set[int] = set()

    async def shadow(self, op: str) -> dict[str, Any]:
        out: dict[str, Any] | None = await self.lx.hv_call("shadow_op", domid=self.domid, op=op)
        return out or {"pages": [], "digests": []}

    async def send_pages(self, look: dict[str, Any]) -> int:
        """One round: the pages of ``look`` and the ones owed from the last round."""
        digest = dict(zip(look["pages"], look["digests"], strict=True))
        gfns = sorted(set(digest) | self.resend)
        self.resend = set()
        sent = 0
        for i in range(0, len(gfns), BATCH_PAGES):
            sent += await self._send_batch(gfns[i : i + BATCH_PAGES], digest)
        self.result.pages_per_round.append(sent)
        self.result.pages_sent += sent
        return sent

    async def _send_batch(self, gfns: list[int], digest: dict[int, bytes]) -> int:
        fm = await self.lx.hv_call("map_foreign", domid=self.domid, gfns=gfns)
        live = [(g, off) for g, off in zip(gfns, fm["offsets"], strict=True) if off >= 0]
        # A page with no frame any more goes as XTAB (xg_sr_save.c: write_batch()).
        gone = [g for g, off in zip(gfns, fm["offsets"], strict=True) if off < 0]
        pfns = [g for g, _ in live]
        data = b""
        if live:
            offsets = [o for _, o in live]
            data = await trio.to_thread.run_sync(_read_frames, fm["mem_path"], offsets)
        for i, gfn in enumerate(pfns):
            page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            if digest.get(gfn) != hashlib.sha1(page, usedforsecurity=False).digest():
                self.resend.add(gfn)  # written since its look: it goes again next round
        buf = io.BytesIO()
        memory_stream.write_page_data(buf, pfns, [data], xtab=gone)
        await self.ch.send(buf.getbuffer())
        return len(pfns)


def _read_frames(mem_path: str, offsets: Sequence[int]) -> bytes:
    out = bytearray(len(offsets) * PAGE_SIZE)
    view = memoryview(out)
    fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        at = 0
        for ext in coalesce(offsets):
            got = os.preadv(fd, [view[at : at + ext.length]], ext.offset)
            if got != ext.length:
                raise ToolstackError(f"short read of guest memory at {ext.offset:#x}")
            at += ext.length
    finally:
        os.close(fd)
    return bytes(out)


async def migrate(
    lx: Libxl,
    domid: int,
    s: trio.abc.Stream,
    destination: str,
    *,
    max_rounds: int = MAX_ROUNDS,
    dirty_threshold: int = DIRTY_THRESHOLD,
) -> MigrateResult:
    """Migrate ``domid`` live over ``s`` to a ``migrate-receive`` at ``destination``."""
    t0 = time.monotonic()
    await lx.domain_info(domid)
    loaded = lx.load_config(domid)
    if loaded is None:
        raise ToolstackError(f"domain {domid} was not built by this toolstack: no configuration")
    config, uuid = loaded
    ch = _Channel(s)
    result = MigrateResult(domid, destination, 0, 0)
    sender = _Sender(lx, domid, ch, result)
    await ch.expect(RECEIVER_BANNER, "the receiver's banner")
    suspended_at: float | None = None
    try:
        await _send_head(ch, config.with_overrides(uuid=uuid), result)
        await _precopy(lx, domid, sender, max_rounds, dirty_threshold)
        suspended_at = time.monotonic()
        clock = await _stop_and_copy(lx, domid, sender, ch, config.toolstack, result)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await _resume(lx, domid, suspended_at is not None)
        _explain_failure(exc, domid, destination)
        raise
    # The receiver owns the domain now: a lost final report does not bring ours back.
    with suppress(ToolstackError, trio.BrokenResourceError, trio.ClosedResourceError):
        await ch.expect(FINAL_REPORT, "the receiver's final report")
    clock.mark("handover")
    result.stop_copy_s = {k: round(v, 4) for k, v in clock.phases.items()}
    result.downtime_s = time.monotonic() - (suspended_at or t0)
    await lx.destroy(domid)
    result.bytes = ch.sent
    result.total_s = time.monotonic() - t0
    return result


async def _stop_and_copy(
    lx: Libxl, domid: int, sender: _Sender, ch: _Channel, toolstack: str, result: MigrateResult
) -> Clock:
    """Suspend, send the pages written since the last look, the tail, and wait for the
    receiver's go-ahead (libxl's stop-and-copy); the clock of its steps."""
    clock = Clock()
    state = await _suspend(lx, domid)
    clock.mark("suspend")
    final = await sender.shadow("clean")
    clock.mark("final_look")
    await sender.send_pages(final)
    await sender.shadow("off")
    await _global_dirty_log(lx, domid, False)
    clock.mark("last_round")
    await _send_tail(lx, domid, ch, toolstack, state, result)
    clock.mark("tail")
    if await ch.expect(RECEIVER_REPORT, "the receiver's report"):
        raise ToolstackError("the receiver could not restore the domain")
    clock.mark("destination")
    await ch.send(PERMISSION_TO_GO)
    return clock


def _explain_failure(exc: BaseException, domid: int, destination: str) -> None:
    """Raise the one-line error for a migration that failed with ``exc`` (the domain was
    resumed here); return for anything else, which the caller re-raises."""
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        raise ToolstackError(
            f"migration of domain {domid} to {destination} failed: the connection broke "
            f"({exc or type(exc).__name__}); the domain runs on here"
        ) from None
    if isinstance(exc, ToolstackError):
        raise ToolstackError(
            f"migration of domain {domid} to {destination} failed: {exc}; the domain runs on here"
        ) from None


async def _send_head(ch: _Channel, config: DomainConfig, result: MigrateResult) -> None:
    """The xl header, the libxl stream header and LIBXC_CONTEXT with the libxc headers."""
    head = io.BytesIO()
    savefile.write_header(head, config)
    stream.write_header(head)
    stream.write_record(head, RecordType.LIBXC_CONTEXT)
    memory_stream.write_headers(head)
    await ch.send(head.getvalue())
    result.records.append(RecordType.LIBXC_CONTEXT.name)


async def _precopy(
    lx: Libxl, domid: int, sender: _Sender, max_rounds: int, dirty_threshold: int
) -> None:
    """Log-dirty rounds until few pages are left dirty or the rounds run out (cf. libxc's
    xg_sr_save.c: send_memory_live()).  The look that finds few pages left is still sent live,
    as libxc sends the pages of its last CLEAN before it stops: the clean took them out of the
    log, so the look after the suspend would not name them again."""
    result = sender.result
    look = await sender.shadow("enable_logdirty")
    await _global_dirty_log(lx, domid, True)
    last = False
    while True:
        await sender.send_pages(look)
        result.precopy_rounds += 1
        if last or result.precopy_rounds >= max_rounds:
            return
        look = await sender.shadow("clean")
        last = len(set(look["pages"]) | sender.resend) <= dirty_threshold


async def _global_dirty_log(lx: Libxl, domid: int, enable: bool) -> None:
    """libxl's ``xen-set-global-dirty-log``; a device model that cannot do it is no reason
    to stop (the hypervisor's log catches its writes too)."""
    if await lx.dm_pid(domid) is None:
        return
    with suppress(QmpError, QmpProtocolError, ToolstackError):
        async with lx.qmp_session(domid) as q:
            await lx.qmp_call(q, domid, "xen-set-global-dirty-log", enable=enable)


async def _suspend(lx: Libxl, domid: int) -> Path:
    """Pause the guest, stop the device model and save its state (``live``, as libxl does)."""
    state = lx.run.save_state(domid)
    state.parent.mkdir(parents=True, exist_ok=True)
    await lx.hv_call("domain_pause", domid=domid)
    try:
        async with lx.qmp_session(domid) as q:
            await lx.qmp_call(q, domid, "stop")
            await lx.qmp_call(q, domid, "xen-save-devices-state", filename=str(state), live=True)
    except QmpError as exc:
        raise ToolstackError(f"the device model could not save its state: {exc}") from None
    if not state.exists():
        raise ToolstackError(f"the device model did not write its state to {state}")
    return state


async def _send_tail(
    lx: Libxl, domid: int, ch: _Channel, toolstack: str, state: Path, result: MigrateResult
) -> None:
    """libxc END, then libxl_stream_write.c's emulator records and END."""
    tail = io.BytesIO()
    memory_stream.write_end(tail)
    if flavour(toolstack).saves_emulator_xenstore_data:
        try:
            pairs = await lx.collect_xenstore_data(domid)
        except XenstoreDataError as exc:
            raise ToolstackError(str(exc)) from None
        if pairs:
            stream.write_record(tail, RecordType.EMULATOR_XENSTORE_DATA, [encode(pairs)])
            result.records.append(RecordType.EMULATOR_XENSTORE_DATA.name)
            result.xenstore_keys = dict(pairs)
    try:
        ctx = await trio.Path(state).read_bytes()
    finally:
        with suppress(FileNotFoundError):
            state.unlink()
    stream.write_emulator_context_header(tail, len(ctx))
    tail.write(ctx)
    stream.write_padding(tail, stream.EMULATOR_HEADER.size + len(ctx))
    stream.write_record(tail, RecordType.END)
    result.records += [RecordType.EMULATOR_CONTEXT.name, RecordType.END.name]
    await ch.send(tail.getvalue())


async def _resume(lx: Libxl, domid: int, suspended: bool) -> None:
    """Put the source back as it was: log-dirty off, the device model and the guest running
    (libxl's ``libxl__domain_resume`` after a failed migration)."""
    with suppress(HypercallError, HypervisorDisconnected, ToolstackError):
        await lx.hv_call("shadow_op", domid=domid, op="off")
    with suppress(HypercallError, HypervisorDisconnected, ToolstackError):
        await _global_dirty_log(lx, domid, False)
    if suspended:
        with suppress(ToolstackError, QmpError, QmpProtocolError, HypercallError):
            await lx.unpause(domid)
    with suppress(FileNotFoundError):
        lx.run.save_state(domid).unlink()


# --------------------------------------------------------------------------------------------
# The receiver


async def migrate_receive(lx: Libxl, s: trio.abc.Stream) -> dict[str, Any]:
    """Receive one domain over ``s``: build it and load its pages while the stream arrives,
    check the whole stream once it is in, restore the rest paused, report, unpause on
    permission.

    The stream is spooled to an unnamed file in ``RUNDIR/migrate`` (``O_TMPFILE``), so a
    receiver that is killed leaves no file behind, and its guard (:mod:`.migrate_guard`)
    destroys the domain it had begun; the restore reads the spool through ``/proc/self/fd``."""
    ch = _Channel(s)
    t0 = time.monotonic()
    spool_dir = lx.run.root / "migrate"
    spool_dir.mkdir(parents=True, exist_ok=True)
    async with _guarded(lx) as guard, _spooled(spool_dir) as spool:
        await ch.send(RECEIVER_BANNER)
        rx = _Receiving(StreamFollower(), spool, guard)
        try:
            await _receive(lx, ch, rx)
        except BaseException:
            if rx.incoming is not None:
                with trio.CancelScope(shield=True):
                    await lx.incoming_abort(rx.incoming)
            raise
        assert rx.incoming is not None
        image = Path(f"/proc/self/fd/{spool.fileno()}")
        try:
            restored = await lx.incoming_finish(rx.incoming, image, paused=True)
        except ToolstackError:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await ch.send(RECEIVER_REPORT + b"\x01")
            raise
        try:
            await ch.send(RECEIVER_REPORT + b"\x00")
            await ch.expect(PERMISSION_TO_GO, "permission to go")
        except BaseException:
            with trio.CancelScope(shield=True):
                await lx.destroy(restored.domid)
            raise
        await lx.unpause(restored.domid)
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await ch.send(FINAL_REPORT + b"\x00")
    out = restored.as_dict()
    out.update(stream_records=rx.follower.records, stream_bytes=rx.follower.offset)
    out["total_s"] = time.monotonic() - t0
    return out


@dataclass
class _Receiving:
    follower: StreamFollower
    spool: IO[bytes]
    #: The guard's stdin (:mod:`toolstack.migrate_guard`): told the domid once there is one.
    guard: trio.abc.SendStream
    #: The domain under construction, once the stream's configuration is in.
    incoming: Incoming | None = None


@asynccontextmanager
async def _spooled(spool_dir: Path) -> AsyncIterator[IO[bytes]]:
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        yield spool


@asynccontextmanager
async def _guarded(lx: Libxl) -> AsyncIterator[trio.abc.SendStream]:
    """The guard process that destroys the half-received domain should this receiver die; on
    the way out (the domain settled, or removed by the receiver itself) it is told ``done``."""
    argv = [sys.executable, "-m", "toolstack.migrate_guard", str(lx.run.root)]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
    )
    assert proc.stdin is not None
    try:
        yield proc.stdin
    finally:
        with trio.CancelScope(shield=True):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await proc.stdin.send_all(b"done\n")
            await proc.stdin.aclose()
            with trio.move_on_after(_GUARD_EXIT_S):
                await proc.wait()


async def _receive(lx: Libxl, ch: _Channel, rx: _Receiving) -> None:
    """Spool the stream until its END; build the domain when the configuration is in and load
    each PAGE_DATA record as it completes."""
    follower, spool = rx.follower, rx.spool
    # A second open file description of the spool: reads there leave the writes' offset be.
    with open(f"/proc/self/fd/{spool.fileno()}", "rb") as back:
        while not follower.done:
            data = await ch.receive_some(min(follower.wants(), _RECV_CHUNK))
            if not data:
                raise ToolstackError(
                    f"the sender closed the connection after {follower.offset} bytes, "
                    "before the END record"
                )
            follower.feed(data)
            await trio.to_thread.run_sync(spool.write, data)
            events = follower.take_events()
            if events:
                await trio.to_thread.run_sync(spool.flush)
            for kind, start, _end in events:
                back.seek(start)
                if kind == "config":
                    config = savefile.read_header(ImageReader(back)).config
                    if config is None:
                        raise StreamError("the stream carries no domain configuration", 0)
                    rx.incoming = await lx.incoming_begin(config)
                    await rx.guard.send_all(f"domid {rx.incoming.built.domid}\n".encode())
                elif rx.incoming is not None:
                    rec = memory_stream.read_page_data(ImageReader(back))
                    await lx.incoming_pages(rx.incoming, spool.fileno(), rec)
    await trio.to_thread.run_sync(spool.flush)

"""Restoring a domain as ``libxl_stream_read.c`` (with ``libxl_create.c``'s restore path)
does: check the whole image, build the domain, load its memory, plant the emulator's
xenstore data and start the device model on the saved state."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from xenstored_sim.wire import LocalProtocolError, XsError

from ..config import DomainConfig
from ..emulator_xenstore import dm_root
from ..flavours import flavour
from ..image import ImageIndex, copy_emulator_context, read_image, restore_pages
from ..memory_stream import PageDataRecord, coalesce
from ..session import ToolstackError
from ..streamio import StreamError, copy_range
from .create import Create
from .results import Clock, Made, RestoreResult


def _load_memory_file(
    image: Path, index: ImageIndex, frames: Mapping[int, int], mem_path: str
) -> int:
    assert index.memory is not None
    # Every frame is fresh from populate_physmap, so already zero: holes need no copy.
    with open(mem_path, "r+b") as mem, open(image, "rb") as f:
        return restore_pages(f.fileno(), index.memory, frames, mem.fileno(), frames_zeroed=True)


def _copy_context_file(image: Path, index: ImageIndex, out_path: Path) -> int:
    with open(image, "rb") as f, open(out_path, "wb") as out:
        return copy_emulator_context(f, index, out)


def _read_index(image: Path) -> ImageIndex:
    with open(image, "rb") as f:
        return read_image(f)


def _copy_record(spool: int, rec: PageDataRecord, frames: Mapping[int, int], mem_path: str) -> int:
    """Copy the pages of ``rec`` from the stream file ``spool`` into their frames."""
    offsets = [frames[p] for p in rec.data_pfns]
    fd = os.open(mem_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        at = rec.data_offset
        for ext in coalesce(offsets):
            copy_range(spool, at, fd, ext.offset, ext.length)
            at += ext.length
    finally:
        os.close(fd)
    return len(offsets)


@dataclass(slots=True)
class Built:
    """A domain a restore has built, and what the rest of the restore needs of it."""

    config: DomainConfig
    name: str
    domid: int
    made: Made
    t0: float


@dataclass(slots=True)
class Incoming:
    """A domain restored from a stream that is still arriving (``xl migrate-receive``): built
    once the stream's configuration is in, then loaded one PAGE_DATA record at a time as
    libxc's restore does (xg_sr_restore.c: process_page_data()), so that the pre-copy rounds
    are in place before the sender suspends and only its last round is left for the downtime."""

    built: Built
    #: Every pfn populated so far, and the offset of its frame in the memory file.
    frames: dict[int, int] = field(default_factory=dict)
    mem_path: str = ""
    pages: int = 0
    #: Seconds spent populating and loading while the stream arrived.
    loading_s: float = 0.0


class Restore(Create):
    """``libxl_domain_create_restore``: the restore half of the stream."""

    async def incoming_begin(self, config: DomainConfig) -> Incoming:
        """Build the domain of a stream whose configuration is in (libxl builds it before
        ``xc_domain_restore`` reads the memory)."""
        t0 = time.monotonic()
        name = await self._pick_name(config)
        made = Made()
        try:
            domid, _ = await self._start_domain(config, name, made, restore=True)
        except BaseException:
            await self._rollback(made)
            raise
        return Incoming(Built(config, name, domid, made, t0))

    async def incoming_pages(self, inc: Incoming, spool: int, rec: PageDataRecord) -> None:
        """One PAGE_DATA record arrived: populate its new pfns and copy its pages in.  A pfn
        populated once stays populated (libxc's populate_pfns())."""
        t0 = time.monotonic()
        domid = inc.built.domid
        new = [p for p in dict.fromkeys((*rec.data_pfns, *rec.alloc_pfns)) if p not in inc.frames]
        if new:
            await self._populate(domid, new)
            inc.mem_path, offsets = await self._map_foreign(domid, new)
            inc.frames.update(zip(new, offsets, strict=True))
        if rec.data_pfns:
            copy = partial(_copy_record, spool, rec, inc.frames, inc.mem_path)
            inc.pages += await trio.to_thread.run_sync(copy)
        inc.loading_s += time.monotonic() - t0

    async def incoming_finish(self, inc: Incoming, image: Path, *, paused: bool) -> RestoreResult:
        """The whole stream is in ``image``: check it as a restore does, then plant the
        emulator's keys, start the device model and unpause unless ``paused``."""
        clock = Clock()
        built = inc.built
        try:
            index, _ = await _check_image(image, None)
            assert index.memory is not None
            missing = [p for p in index.memory.pfns() if p not in inc.frames]
            if missing:
                raise ToolstackError(f"{image}: pfn 0x{missing[0]:x} arrived but was not loaded")
        except BaseException:
            await self._rollback(built.made)
            raise
        clock.phases["loaded_before_end"] = inc.loading_s
        clock.mark("index")
        self.audit.record("memory_restore", call=str(image), domid=built.domid, pages=inc.pages)
        return await self._restore_rest(built, image, index, clock, inc.pages, paused=paused)

    async def incoming_abort(self, inc: Incoming) -> None:
        """Remove what :meth:`incoming_begin` built (the stream broke off)."""
        await self._rollback(inc.built.made)

    async def restore(
        self,
        path: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        paused: bool = False,
    ) -> RestoreResult:
        """Check the whole image, then build the domain from it, plant the device model's
        xenstore keys (as the configured flavour does), start the device model on the saved
        state and unpause (unless ``paused``: ``xl migrate-receive`` restores paused and
        unpauses once the sender lets go).  On any failure everything made is removed again."""
        t0 = time.monotonic()
        clock = Clock()
        image = Path(path)
        index, config = await _check_image(image, overrides)
        name = await self._pick_name(config)
        made = Made()
        try:
            clock.mark("index")
            domid, _ = await self._start_domain(config, name, made, restore=True)
            clock.mark("domain")
            pages = await self._load_memory(domid, image, index, clock)
        except BaseException:
            await self._rollback(made)
            raise
        return await self._restore_rest(
            Built(config, name, domid, made, t0), image, index, clock, pages, paused=paused
        )

    async def _restore_rest(
        self,
        built: Built,
        image: Path,
        index: ImageIndex,
        clock: Clock,
        pages: int,
        *,
        paused: bool,
    ) -> RestoreResult:
        """What follows the memory: the emulator's xenstore data, the device model on the
        saved state, the guest unpaused unless ``paused``; rolled back on any failure."""
        config, domid, made = built.config, built.domid, built.made
        try:
            planted, ignored = await self._restore_xenstore_data(domid, config, index)
            resume = self.run.resume_state(domid)
            resume.parent.mkdir(parents=True, exist_ok=True)
            made.files.append(resume)
            await trio.to_thread.run_sync(_copy_context_file, image, index, resume)
            await self._build_post(domid, config)
            made.introduced = True
            clock.mark("build")
            pid = await self._spawn_dm(config, domid, made, incoming=resume)
            clock.mark("device_model")
            if not paused:
                await self._resume_dm_and_guest(config, domid)
                clock.mark("unpause")
        except BaseException:
            await self._rollback(made)
            raise
        finally:
            for f in made.files:
                if f.name.startswith("qemu-resume."):
                    with suppress(FileNotFoundError):
                        f.unlink()
        return RestoreResult(
            domid=domid,
            name=built.name,
            records=index.records,
            bytes=index.size,
            pages=pages,
            xenstore_keys=planted,
            xenstore_keys_ignored=ignored,
            dm_pid=pid,
            seconds=time.monotonic() - built.t0,
            phases=clock.phases,
        )

    async def _load_memory(self, domid: int, image: Path, index: ImageIndex, clock: Clock) -> int:
        """Populate the saved pfns and copy the LIBXC_CONTEXT pages into them."""
        assert index.memory is not None
        pfns = index.memory.pfns()
        await self._populate(domid, pfns)
        clock.mark("populate")
        mem_path, offsets = await self._map_foreign(domid, pfns)
        clock.mark("map_foreign")
        frames = dict(zip(pfns, offsets, strict=True))
        pages = await trio.to_thread.run_sync(_load_memory_file, image, index, frames, mem_path)
        clock.mark("memory")
        self.audit.record("memory_restore", call=str(image), domid=domid, pages=pages)
        return pages

    async def _restore_xenstore_data(
        self, domid: int, config: DomainConfig, index: ImageIndex
    ) -> tuple[dict[str, str], bool]:
        """The image's EMULATOR_XENSTORE_DATA keys as planted, and whether the flavour ignored
        them."""
        planted: dict[str, str] = {}
        if index.xenstore is None or not index.xenstore.pairs:
            return planted, False
        if not flavour(config.toolstack).restores_emulator_xenstore_data:
            return planted, True
        # libxl__restore_emulator_xenstore_data: plain writes under the device
        # model's root, before the device model exists (docs/qemu-physmap.md, 'libxl: restore', K5).
        stub = await self.xs_read(f"/local/domain/{domid}/image/device-model-domid")
        root = dm_root(domid, int(stub) if stub and stub.isdigit() else 0)
        for key, value in index.xenstore.pairs:
            # libxl ignores the result of each write (the audit keeps it).
            try:
                await self.xs_write(f"{root}/{key}", value)
            except (XsError, LocalProtocolError):
                continue
            planted[key] = value
        return planted, False


async def _check_image(
    image: Path, overrides: Mapping[str, Any] | None
) -> tuple[ImageIndex, DomainConfig]:
    """The image's index and its configuration with ``overrides``, both checked in full
    before anything is built."""
    try:
        index = await trio.to_thread.run_sync(_read_index, image)
    except StreamError as exc:
        raise ToolstackError(f"{image}: {exc}") from None
    except OSError as exc:
        raise ToolstackError(f"cannot read {image}: {exc.strerror or exc}") from None
    if index.config is None:
        raise ToolstackError(f"{image}: the image carries no domain configuration")
    try:
        config = index.config.with_overrides(**dict(overrides or {}))
    except ValueError as exc:
        raise ToolstackError(str(exc)) from None
    assert index.memory is not None
    return index, config

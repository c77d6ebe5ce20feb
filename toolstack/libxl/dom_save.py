"""Saving a domain as ``libxl_dom_save.c`` and ``libxl_stream_write.c`` do: suspend the
guest and the device model, collect the emulator's xenstore data, write the stream v2 image
(:mod:`toolstack.image`) and destroy or resume the domain."""

from __future__ import annotations

import os
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from ..config import DomainConfig, Flavour
from ..emulator_xenstore import PHYSMAP_FIELDS, XenstoreDataError, dm_root, physmap_pairs
from ..flavours import ToolstackFlavour, flavour
from ..image import WriteSummary, save_image
from ..session import DeviceModelError, ToolstackError
from .dom import expand
from .domain import Domain
from .results import Clock, SaveResult


def _write_image_file(
    out_path: Path,
    config: DomainConfig,
    gfns: list[int],
    offsets: list[int],
    mem_path: str,
    pairs: list[tuple[str, str]],
    state_path: Path,
) -> WriteSummary:
    # The frames are read from the memory file itself, at the offsets map_foreign gave: the
    # same bytes a foreign mapping shows, copied in the kernel (image.save_image).
    with (
        open(mem_path, "rb") as mem,
        open(state_path, "rb") as state,
        open(out_path, "wb") as out,
    ):
        return save_image(out.fileno(), config, gfns, offsets, mem.fileno(), pairs, state.fileno())


class Save(Domain):
    """``libxl_domain_suspend``: the save half of the stream."""

    async def collect_xenstore_data(self, domid: int) -> list[tuple[str, str]]:
        """``libxl__save_emulator_xenstore_data`` (libxl_dom_save.c): the physmap keys under
        the device model's root; K3: an entry without all three subkeys fails the save."""
        stub = await self.xs_read(f"/local/domain/{domid}/image/device-model-domid")
        try:
            dm_domid = int(stub) if stub is not None else 0
        except ValueError:
            dm_domid = 0
        root = dm_root(domid, dm_domid)
        entries: dict[str, dict[str, str | None]] = {}
        for child in await self.xs_directory(f"{root}/physmap"):
            sub: dict[str, str | None] = {}
            entries[child] = sub
            for name in PHYSMAP_FIELDS:
                sub[name] = await self.xs_read(f"{root}/physmap/{child}/{name}")
                if sub[name] is None:
                    # libxl stops at the first missing key (goto out); later ones are unread.
                    return physmap_pairs(entries)
        return physmap_pairs(entries)

    async def save(
        self,
        domid: int,
        path: str | os.PathLike[str],
        *,
        checkpoint: bool = False,
        toolstack: Flavour | None = None,
    ) -> SaveResult:
        """Suspend the domain and write its image to ``path`` (through ``path.tmp``).

        Without ``checkpoint`` the domain is destroyed once the image is complete; with it the
        domain runs on.  If the save fails the domain is left paused and can be unpaused.
        """
        t0 = time.monotonic()
        clock = Clock()
        await self.domain_info(domid)
        loaded = self.load_config(domid)
        if loaded is None:
            raise ToolstackError(
                f"domain {domid} was not built by this toolstack: no configuration"
            )
        config, uuid = loaded
        carrier = flavour(toolstack or config.toolstack)
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        state = self.run.save_state(domid)
        state.parent.mkdir(parents=True, exist_ok=True)
        await self.hv_call("domain_pause", domid=domid)
        try:
            await self._suspend_dm(domid, state)
            clock.mark("suspend")
            written = await self._write_stream(
                domid, config.with_overrides(uuid=uuid), carrier, state, tmp, clock
            )
            self.audit.record("image_write", call=str(tmp), domid=domid, bytes=written.bytes)
            tmp.rename(final)
            self.audit.record("image_rename", call=str(final), domid=domid)
        except BaseException as exc:
            with suppress(FileNotFoundError):
                tmp.unlink()
            with suppress(FileNotFoundError):
                state.unlink()
            _raise_save_failed(domid, exc)
            raise
        with suppress(FileNotFoundError):
            state.unlink()
        clock.mark("image")
        await self._finish_save(domid, checkpoint, clock)
        return SaveResult(
            domid=domid,
            file=str(final),
            records=written.records,
            bytes=written.bytes,
            pages=written.pages,
            xenstore_keys=dict(written.pairs),
            checkpoint=checkpoint,
            seconds=time.monotonic() - t0,
            phases=clock.phases,
        )

    async def _suspend_dm(self, domid: int, state: Path) -> None:
        """``libxl__domain_suspend_device_model``: QMP stop, then the device state to ``state``."""
        async with self.qmp_session(domid) as q:
            await self.qmp_call(q, domid, "stop")
            await self.qmp_call(q, domid, "xen-save-devices-state", filename=str(state), live=False)
        if not state.exists():
            raise DeviceModelError(f"the device model did not write its state to {state}")

    async def _write_stream(
        self,
        domid: int,
        config: DomainConfig,
        carrier: ToolstackFlavour,
        state: Path,
        tmp: Path,
        clock: Clock,
    ) -> _Written:
        """``libxl__stream_write_start``: memory, the flavour's emulator records, END."""
        gfns = expand(await self.hv_call("p2m", domid=domid))
        if not gfns:
            raise ToolstackError(f"domain {domid} has no memory to save")
        mem_path, offsets = await self._map_foreign(domid, gfns)
        clock.mark("map_foreign")
        pairs: list[tuple[str, str]] = []
        if carrier.saves_emulator_xenstore_data:
            try:
                pairs = await self.collect_xenstore_data(domid)
            except XenstoreDataError as exc:
                raise ToolstackError(str(exc)) from None
        clock.mark("xenstore_data")
        summary = await trio.to_thread.run_sync(
            _write_image_file, tmp, config, gfns, offsets, mem_path, pairs, state
        )
        clock.mark("memory")
        return _Written(summary.records, summary.bytes, len(gfns), pairs)

    async def _finish_save(self, domid: int, checkpoint: bool, clock: Clock) -> None:
        """A checkpoint resumes the domain (``libxl__domain_resume``); a save destroys it."""
        if checkpoint:
            async with self.qmp_session(domid) as q:
                await self.qmp_call(q, domid, "cont")
            await self.hv_call("domain_unpause", domid=domid)
            clock.mark("resume")
        else:
            await self.destroy(domid)
            clock.mark("destroy")


@dataclass(frozen=True, slots=True)
class _Written:
    """What the stream writer put in the image."""

    records: list[str]
    bytes: int
    pages: int
    pairs: list[tuple[str, str]]


def _raise_save_failed(domid: int, exc: BaseException) -> None:
    """Turn an error into the user's message about the paused domain; cancellation and other
    BaseExceptions pass through (the caller re-raises them)."""
    if isinstance(exc, Exception) and not isinstance(exc, trio.Cancelled):
        why = exc if isinstance(exc, ToolstackError) else f"{type(exc).__name__}: {exc}"
        raise ToolstackError(
            f"save of domain {domid} failed: {why}. The domain is left paused; "
            f"`xl-sim unpause {domid}` resumes it, `xl-sim destroy {domid}` removes it"
        ) from exc

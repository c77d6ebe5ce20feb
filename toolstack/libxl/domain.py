"""Operations on a running domain as ``libxl_domain.c`` has them: info and list, pause and
unpause, destroy (``libxl__destroy_domid``), and the guest's own operations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Any

from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenstored_sim.client import XsDisconnected
from xenstored_sim.wire import XsError

from .. import devicemodel, stubdom
from ..config import DomainConfig
from ..emulator_xenstore import dm_root
from ..qmp import QmpError, QmpProtocolError
from ..session import ToolstackError
from .dm import DeviceModel
from .results import DomainSummary

#: What one step of a teardown may fail with without stopping the others.
_TEARDOWN_ERRORS = (
    ToolstackError,
    XsError,
    HypercallError,
    XsDisconnected,
    HypervisorDisconnected,
    QmpError,
    QmpProtocolError,
    OSError,
)


class Domain(DeviceModel):
    """A domain once built: looked up, listed, paused, unpaused and destroyed."""

    async def domain_info(self, domid: int) -> dict[str, Any]:
        try:
            info: dict[str, Any] = await self.hv_call("domain_getinfo", domid=domid)
        except HypercallError as exc:
            if exc.errno_name in ("ESRCH", "ENOENT", "EINVAL"):
                raise ToolstackError(f"domain {domid} does not exist") from None
            raise
        return info

    def load_config(self, domid: int) -> tuple[DomainConfig, str] | None:
        """The configuration and uuid recorded when the domain was built."""
        for path in self.run.userdata_files(domid):
            try:
                config = DomainConfig.from_json(path.read_text())
            except (OSError, ValueError):
                continue
            uuid = path.name.split(".")[2]
            return config, uuid
        return None

    def domain_config(self, domid: int) -> DomainConfig:
        """The configuration the domain was built with."""
        loaded = self.load_config(domid)
        if loaded is None:
            raise ToolstackError(
                f"domain {domid} was not built by this toolstack: no configuration"
            )
        return loaded[0]

    async def dm_pid(self, domid: int) -> int | None:
        raw = await self.xs_read(f"/local/domain/{domid}/image/device-model-pid")
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    async def list_domains(self) -> list[DomainSummary]:
        infos: list[dict[str, Any]] = await self.hv_call("domain_list")
        out: list[DomainSummary] = []
        for info in infos:
            domid = int(info["domid"])
            loaded = self.load_config(domid)
            cfg = loaded[0] if loaded else None
            out.append(
                DomainSummary(
                    domid=domid,
                    name=str(info["name"]),
                    paused=bool(info["paused"]),
                    tot_pages=int(info["tot_pages"]),
                    max_pages=int(info["max_pages"]),
                    memory_mib=cfg.memory_mib if cfg else None,
                    vga=cfg.vga if cfg else None,
                    dm_mode=cfg.dm_mode if cfg else None,
                    dm_restrict=cfg.dm_restrict if cfg else None,
                    toolstack=cfg.toolstack if cfg else None,
                    dm_pid=await self.dm_pid(domid),
                )
            )
        return out

    async def destroy(self, domid: int) -> None:
        """Stop the device model, remove the domain's xenstore trees, release it, destroy it
        in the hypervisor and remove its files (``libxl__destroy_domid``)."""
        known = any(int(d["domid"]) == domid for d in await self.hv_call("domain_list"))
        has_tree = await self.xs_read(f"/local/domain/{domid}/name") is not None
        if not known and not has_tree and not self.run.userdata_files(domid):
            raise ToolstackError(f"domain {domid} does not exist")
        loaded = self.load_config(domid)
        # The device model's log stays, as xl keeps /var/log/xen/qemu-dm-NAME.log.
        errors = await self._teardown(domid, None, loaded[1] if loaded else None, keep_log=True)
        if errors:
            raise ToolstackError(f"destroy of domain {domid} was incomplete: " + "; ".join(errors))

    async def _teardown(
        self, domid: int, pid: int | None, uuid: str | None, *, keep_log: bool
    ) -> list[str]:
        """Every step of a destroy, each attempted even when an earlier one failed; returns
        what failed."""
        dom = f"/local/domain/{domid}"
        errors: list[str] = []

        async def step(what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
            try:
                return await fn()
            except _TEARDOWN_ERRORS as exc:
                self.audit.record("teardown_step", type(exc).__name__, call=what, domid=domid)
                errors.append(f"{what}: {exc}")
                return None

        recorded = await step("read the device model pid", lambda: self.dm_pid(domid))
        vm = await step("read the vm path", lambda: self.xs_read(f"{dom}/vm"))
        stub = await step("read the stub domain", lambda: stubdom.stub_of(self, domid))
        # libxl__destroy_device_model: the device model's directory goes first, then the process.
        await step(
            "remove the device model's xenstore directory", lambda: self.xs_rm(dm_root(domid))
        )
        for dm in sorted({p for p in (pid, recorded) if isinstance(p, int)}):
            await step("stop the device model", partial(self._stop_dm, domid, dm))
        if isinstance(stub, int):
            await step("destroy the stub domain", partial(stubdom.destroy, self, stub))
        # Once more after the process is gone: between libxl__destroy_device_model's xs_rm and
        # the kill, a live device model can write its state node again (libxl leaves that).
        await step(
            "remove the device model's xenstore directory", lambda: self.xs_rm(dm_root(domid))
        )
        with suppress(FileNotFoundError):
            self.run.qmp(domid).unlink()
        await step(f"remove {dom}", lambda: self.xs_rm(dom))
        vm_paths = {p for p in (vm, f"/vm/{uuid}" if uuid else None) if isinstance(p, str)}
        for path in sorted(vm_paths):
            if path.startswith("/vm/"):
                await step(f"remove {path}", partial(self.xs_rm, path))
        await step(f"remove /libxl/{domid}", lambda: self.xs_rm(f"/libxl/{domid}"))
        await step("release the domain in xenstore", partial(self._xs_release, domid))
        await step("destroy the domain in the hypervisor", partial(self._hv_destroy, domid))
        self._remove_files(domid, keep_log=keep_log)
        return errors

    async def _xs_release(self, domid: int) -> None:
        try:
            await self.xs.release(domid)
        except XsError as exc:
            # Not introduced yet (a create that failed early): nothing to release.
            self.audit.record("xs_release", exc.errno_name, domid=domid)
            return
        self.audit.record("xs_release", domid=domid)

    async def _hv_destroy(self, domid: int) -> None:
        try:
            await self.hv_call("domain_destroy", domid=domid)
        except HypercallError as exc:
            if exc.errno_name not in ("ESRCH", "ENOENT", "EINVAL"):
                raise

    def _remove_files(self, domid: int, *, keep_log: bool) -> None:
        """The domain's userdata, device-model state files and (unless kept) its log."""
        files = [
            *self.run.userdata_files(domid),
            self.run.save_state(domid),
            self.run.resume_state(domid),
        ]
        if not keep_log:
            files.append(self.run.dm_log(domid))
        for leftover in files:
            with suppress(FileNotFoundError):
                leftover.unlink()

    async def pause(self, domid: int) -> None:
        """Pause the device model (QMP stop) and the guest, as ``libxl__domain_pause``."""
        await self.domain_info(domid)
        if await self.dm_pid(domid) is not None:
            async with self.qmp_session(domid) as q:
                await self.qmp_call(q, domid, "stop")
        await self.hv_call("domain_pause", domid=domid)

    async def unpause(self, domid: int) -> None:
        """Resume the device model (QMP cont) and unpause the guest.

        A device model that has died (killed during a save, say) has nothing to resume: the
        guest is unpaused without it, as the failed save's message promises."""
        await self.domain_info(domid)
        pid = await self.dm_pid(domid)
        if pid is not None and devicemodel.pid_alive(pid):
            async with self.qmp_session(domid) as q:
                await self.qmp_call(q, domid, "cont")
        elif pid is not None:
            self.audit.record("dm_gone", domid=domid, dm_pid=pid)
        await self.hv_call("domain_unpause", domid=domid)

    async def guest_ops(self, domid: int, ops: list[dict[str, Any]]) -> list[Any]:
        result: list[Any] = await self.hv_call("guest", domid=domid, ops=ops)
        return result

    async def guest_driver(self, domid: int, action: str, params: Mapping[str, Any]) -> Any:
        device = self.domain_config(domid).vga
        return await self.hv_call(
            "guest_driver", domid=domid, device=device, action=action, params=dict(params)
        )

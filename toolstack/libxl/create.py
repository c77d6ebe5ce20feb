"""Domain creation as ``libxl_create.c`` does it: pick a name, make the domain and its
xenstore tree (``libxl__domain_make``), build it, start the device model and unpause; a
failure part-way is rolled back."""

from __future__ import annotations

import time
import uuid as uuidlib
from contextlib import suppress
from pathlib import Path
from typing import Final

import trio

from xenstored_sim.client import Transaction, open_xenstore
from xenstored_sim.wire import XsError

from ..config import DomainConfig
from ..emulator_xenstore import dm_root
from ..memory_stream import PAGE_SHIFT
from ..session import ToolstackError
from .domain import Domain
from .results import CreateResult, Made

#: Bound on cleanup work that runs shielded from cancellation.
CLEANUP_BOUND: Final = 20.0
#: How long a rollback waits for a xenstored that went away to accept connections again.
XS_RECONNECT_BOUND: Final = 5.0


class Create(Domain):
    """``libxl_domain_create_new`` and the steps create and restore share."""

    async def _pick_name(self, config: DomainConfig) -> str:
        names = {str(d["name"]) for d in await self.hv_call("domain_list")}
        if config.name is not None:
            # libxl__domain_rename refuses a name another domain already has.
            if config.name in names:
                raise ToolstackError(f"a domain named {config.name!r} already exists")
            return config.name
        n = 1
        while f"guest-{n}" in names:
            n += 1
        return f"guest-{n}"

    async def _write_domain_tree(self, domid: int, name: str, uuid: str) -> None:
        """The xenstore tree of ``libxl__domain_make`` (libxl_create.c), in one transaction."""
        dom = f"/local/domain/{domid}"
        vm = f"/vm/{uuid}"
        lx = f"/libxl/{domid}"
        ro = ["n0", f"r{domid}"]  # owned by dom0, readable by the guest
        rw = [f"n{domid}"]  # owned by the guest
        no = ["n0"]  # dom0 only

        async def fill(t: Transaction) -> None:
            async def rm(path: str) -> None:
                with suppress(XsError):
                    await self.xs_call("rm", path, t.rm(path), tx=True)

            async def mknod(path: str, perms: list[str]) -> None:
                # libxl__xs_mknod: an empty node, then its permissions.
                await self.xs_call("write", path, t.write(path, ""), tx=True)
                await self.xs_call("set_perms", path, t.set_perms(path, perms), tx=True)

            async def write(path: str, value: str) -> None:
                await self.xs_call("write", path, t.write(path, value), tx=True)

            await rm(dom)
            # Left by an earlier domain with this domid that was never destroyed (it died
            # with the hypervisor): its "running" must not pass for the new device model's.
            await rm(dm_root(domid))
            await mknod(dom, ro)
            await rm(vm)
            await mknod(vm, ro)
            await rm(lx)
            await mknod(lx, no)
            await mknod(f"{lx}/device", no)
            await write(f"{dom}/vm", vm)
            await write(f"{dom}/name", name)
            await mknod(f"{dom}/cpu", ro)
            await mknod(f"{dom}/memory", ro)
            await mknod(f"{dom}/device", ro)
            await mknod(f"{dom}/device/suspend/event-channel", rw)
            await mknod(f"{dom}/control", ro)
            await mknod(f"{dom}/hvmloader", ro)
            for node in (
                "shutdown",
                "feature-poweroff",
                "feature-reboot",
                "feature-suspend",
                "feature-s3",
                "feature-s4",
                "sysrq",
            ):
                await mknod(f"{dom}/control/{node}", rw)
            for node in ("data", "drivers", "feature", "attr", "error"):
                await mknod(f"{dom}/{node}", rw)
            await write(f"{vm}/uuid", uuid)
            await write(f"{vm}/name", name)
            await write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1")
            await write(f"{dom}/control/platform-feature-xs_reset_watches", "1")
            await write(f"{lx}/type", "hvm")

        await self.xs.run_transaction(fill)

    def _store_userdata(self, domid: int, uuid: str, config: DomainConfig) -> Path:
        path = self.run.userdata(domid, uuid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(config.to_json())
        tmp.rename(path)
        self.audit.record("userdata_store", call=str(path), domid=domid)
        return path

    async def _start_domain(
        self, config: DomainConfig, name: str, made: Made, *, restore: bool
    ) -> tuple[int, str]:
        # A restored domain keeps its uuid, as xl restore does from the saved config, unless
        # the saved domain still runs (a checkpoint restored beside it).
        uuid = config.uuid or str(uuidlib.uuid4())
        if any(self.run.lib.glob(f"userdata-d.*.{uuid}.libxl-json")):
            uuid = str(uuidlib.uuid4())
        made.uuid = uuid
        domid = int(
            (
                await self.hv_call(
                    "domain_create", name=name, max_pages=self.max_pages(config), hvm=True
                )
            )["domid"]
        )
        made.domid = domid
        # The hypervisor gave out this domid: any configuration recorded under it belongs to
        # a domain that no longer exists (libxl keys userdata by domid).
        for stale in self.run.userdata_files(domid):
            stale.unlink(missing_ok=True)
        made.files.append(
            self._store_userdata(domid, uuid, config.with_overrides(name=name, uuid=uuid))
        )
        if not restore:
            await self._populate(domid, list(range(config.memory_mib << 20 >> PAGE_SHIFT)))
        made.tree = True
        await self._write_domain_tree(domid, name, uuid)
        return domid, uuid

    # ---------------------------------------------------------------- create

    async def create(self, config: DomainConfig) -> CreateResult:
        """Build a domain, start its device model, wait for it and unpause the guest."""
        t0 = time.monotonic()
        name = await self._pick_name(config)
        made = Made()
        try:
            domid, uuid = await self._start_domain(config, name, made, restore=False)
            await self._build_post(domid, config)
            made.introduced = True
            pid = await self._spawn_dm(config, domid, made, incoming=None)
            await self._resume_dm_and_guest(config, domid)
        except BaseException:
            await self._rollback(made)
            raise
        return CreateResult(domid, name, uuid, pid, time.monotonic() - t0)

    async def _resume_dm_and_guest(self, config: DomainConfig, domid: int) -> None:
        if config.dm_restrict:
            # Started with -S: libxl's unpause resumes the device model with QMP cont.
            async with self.qmp_session(domid) as q:
                await self.qmp_call(q, domid, "cont")
        await self.hv_call("domain_unpause", domid=domid)

    async def _rollback(self, made: Made) -> None:
        """Undo a failed create or restore, shielded so that cancellation cannot stop it.

        If the failure took the xenstore connection with it, a fresh one is opened for the
        clean-up.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_BOUND):
            if made.domid is None:
                return
            self.audit.record("rollback", domid=made.domid)
            if self.xs.connected:
                errors = await self._teardown(made.domid, made.dm_pid, made.uuid, keep_log=True)
                if not errors:
                    return
                # xenstored may have gone away under the teardown: its steps are redone on a
                # fresh connection (each is idempotent).
            # A xenstored killed under us may still accept a connection or two while it dies;
            # one restarted with --state-dir comes back with its tree.
            deadline = trio.current_time() + XS_RECONNECT_BOUND
            while True:
                await self._wait_for_xenstore(deadline)
                try:
                    async with open_xenstore(self.run.xenstore_socket) as xs:
                        lost, self.xs = self.xs, xs
                        try:
                            errors = await self._teardown(
                                made.domid, made.dm_pid, made.uuid, keep_log=True
                            )
                        finally:
                            self.xs = lost
                        if not errors or xs.connected or trio.current_time() >= deadline:
                            return
                    await trio.sleep(0.05)
                except OSError:
                    if trio.current_time() >= deadline:
                        break
                    await trio.sleep(0.05)
            self.audit.record("xs_reconnect", "unreachable", domid=made.domid)
            await self._teardown(made.domid, made.dm_pid, made.uuid, keep_log=True)

    async def _wait_for_xenstore(self, deadline: float) -> None:
        """Wait until ``deadline`` for the xenstore socket to accept a connection."""
        with trio.move_on_at(deadline):
            while True:
                try:
                    probe = await trio.open_unix_socket(str(self.run.xenstore_socket))
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await probe.aclose()
                return

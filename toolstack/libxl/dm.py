"""The device model as ``libxl_dm.c`` runs it: spawn ``qemu-model`` (locally or for a stub
domain, ``libxl__spawn_local_dm``/``libxl__spawn_stub_dm``), wait until it is ready, speak QMP
to it and stop it (``libxl__destroy_device_model``)."""

from __future__ import annotations

import signal
from contextlib import suppress
from pathlib import Path
from typing import Final

import trio

import xenhost

from .. import devicemodel, stubdom
from ..config import DomainConfig
from ..emulator_xenstore import dm_root
from ..qmp import QmpError, QmpProtocolError, open_qmp
from ..session import DeviceModelError, ToolstackError
from .dom import DomainBuilder
from .results import Made

#: libxl's LIBXL_DEVICE_MODEL_START_TIMEOUT, in seconds.
DM_START_TIMEOUT: Final = 60.0
#: How long a stopping device model gets after QMP quit, then after SIGTERM.
DM_QUIT_GRACE: Final = 3.0
DM_TERM_GRACE: Final = 3.0


class DeviceModel(DomainBuilder):
    """Spawning, waiting for, resuming and stopping a domain's device model."""

    #: How long a device model may take to become ready (libxl's spawn timeout).
    dm_start_timeout: float = DM_START_TIMEOUT

    async def _spawn_dm(
        self, config: DomainConfig, domid: int, made: Made, *, incoming: Path | None
    ) -> int:
        # The device model's directory, made as libxl__spawn_local_dm does: a plain mkdir,
        # so it inherits /local/domain/0/device-model's permissions (dom0 only).
        root = dm_root(domid)
        await self.xs_call("mkdir", root, self.xs.mkdir(root))
        xenstore = self.run.dm_xenstore_socket
        dm_domid = 0
        if config.dm_stubdom:
            # The device model acts as its stub domain, on that domain's socket
            # (docs/qemu-physmap.md, 'Stub domains').
            dm_domid = await stubdom.build(self, domid, config.stubdom_grants)
            xenstore = str(stubdom.guest_socket(self, dm_domid))
        program = devicemodel.dm_program()
        argv = devicemodel.dm_argv(
            config,
            domid,
            str(self.run.root),
            xenstore,
            str(self.run.dm_hypervisor_socket),
            incoming=str(incoming) if incoming is not None else None,
        )
        log = self.run.dm_log(domid)
        xenhost.RunDir(self.run.root).qmp_dir.mkdir(parents=True, exist_ok=True)
        pid = xenhost.spawn_detached(program, argv, log)
        made.dm_pid = pid
        self.audit.record(
            "spawn", call=" ".join([devicemodel.DM_PROGRAM, *argv]), domid=domid, dm_pid=pid
        )
        await self.xs_write(f"/local/domain/{domid}/image/device-model-pid", str(pid))
        await self._wait_dm_ready(config, domid, dm_domid, pid, restore=incoming is not None)
        return pid

    async def _wait_dm_ready(
        self, config: DomainConfig, domid: int, dm_domid: int, pid: int, *, restore: bool
    ) -> None:
        """Wait as libxl's spawn does: for ``running`` in the state node of the domain the
        device model runs in (``dm_domid``, 0 without a stub domain), or with ``dm_restrict``
        for QMP ``query-status`` (docs/qemu-physmap.md, 'Start-up and readiness').  A device model that exits first, or
        takes longer than :attr:`dm_start_timeout`, is an error."""
        died = False
        failure: BaseException | None = None

        async with trio.open_nursery() as nursery:

            async def watch_process() -> None:
                nonlocal died
                while devicemodel.pid_alive(pid):
                    await trio.sleep(0.02)
                died = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_process)
            try:
                with trio.fail_after(self.dm_start_timeout):
                    if config.dm_restrict:
                        await self._wait_qmp_status(domid, "paused" if restore else "prelaunch")
                    else:
                        await self._wait_state_running(domid, dm_domid)
            except Exception as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        log = self.run.dm_log(domid)
        if died:
            self.audit.record("dm_ready", "died", domid=domid, dm_pid=pid)
            tail = devicemodel.log_tail(log)
            raise DeviceModelError(
                f"the device model of domain {domid} (pid {pid}) exited during start-up"
                + (f"; its log {log} ends with:\n{tail}" if tail else f"; see {log}")
            )
        if isinstance(failure, trio.TooSlowError):
            self.audit.record("dm_ready", "timeout", domid=domid, dm_pid=pid)
            raise DeviceModelError(
                f"the device model of domain {domid} was not ready within "
                f"{self.dm_start_timeout:g} s; see {log}"
            )
        if failure is not None:
            self.audit.record("dm_ready", type(failure).__name__, domid=domid, dm_pid=pid)
            if isinstance(failure, ToolstackError):
                raise failure
            raise DeviceModelError(f"the device model of domain {domid} failed to start: {failure}")
        self.audit.record("dm_ready", domid=domid, dm_pid=pid)

    async def _wait_state_running(self, domid: int, dm_domid: int) -> None:
        # QEMU writes the relative ``device-model/<domid>/state``, which xenstored resolves
        # under the home of the device model's own connection (docs/qemu-physmap.md, 'Start-up and
        # readiness'): dom0's tree for a dom0 device model, the stub's tree (made stub-owned,
        # docs/qemu-physmap.md, 'Stub domains') otherwise.
        path = f"{dm_root(domid, dm_domid)}/state"
        async with self.xs.watch(path, f"dm-state-{domid}") as events:
            self.audit.record("xs_watch", path=path)
            async for _ in events:
                if await self.xs_read(path) == "running":
                    return

    async def _wait_qmp_status(self, domid: int, expected: str) -> None:
        path = self.run.qmp(domid)
        while True:
            if path.exists():
                try:
                    async with open_qmp(path) as q:
                        while True:
                            status = await self.qmp_call(q, domid, "query-status")
                            state = status.get("status") if isinstance(status, dict) else None
                            if state == expected:
                                return
                            if state != "inmigrate":
                                raise DeviceModelError(
                                    f"unexpected device model status {state!r} "
                                    f"(expected {expected!r})"
                                )
                            await trio.sleep(0.02)
                except QmpProtocolError:
                    pass
            await trio.sleep(0.02)

    async def _stop_dm(self, domid: int, pid: int | None) -> None:
        """QMP quit, then SIGTERM, then SIGKILL, waiting for the process each time."""
        if pid is not None and devicemodel.pid_alive(pid):
            if not devicemodel.is_device_model(pid, domid):
                self.audit.record("dm_stop", "not-our-process", domid=domid, dm_pid=pid)
            else:
                with trio.move_on_after(DM_QUIT_GRACE):
                    with suppress(QmpError, QmpProtocolError, OSError):
                        async with open_qmp(self.run.qmp(domid)) as q:
                            await self.qmp_call(q, domid, "quit")
                    await self._wait_exit(pid)
                for sig, grace in (
                    (signal.SIGTERM, DM_TERM_GRACE),
                    (signal.SIGKILL, DM_TERM_GRACE),
                ):
                    if not devicemodel.pid_alive(pid):
                        break
                    devicemodel.send_signal(pid, sig)
                    self.audit.record("kill", call=sig.name, domid=domid, dm_pid=pid)
                    with trio.move_on_after(grace):
                        await self._wait_exit(pid)
                self.audit.record(
                    "dm_stop",
                    "ok" if not devicemodel.pid_alive(pid) else "still-running",
                    domid=domid,
                    dm_pid=pid,
                )
        with suppress(FileNotFoundError):
            self.run.qmp(domid).unlink()

    @staticmethod
    async def _wait_exit(pid: int) -> None:
        while devicemodel.pid_alive(pid):
            await trio.sleep(0.02)

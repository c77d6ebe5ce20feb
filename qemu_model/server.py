"""The device-model process: the trio shell around :class:`~qemu_model.machine.Machine`.

It owns every connection: the hypervisor (trio client for ioreqs, blocking privcmd for
foreign mappings and hypercalls made from device code), xenstore, and the QMP socket.  Device
code runs in a worker thread under one lock, the way QEMU's runs under the big QEMU lock; when
it needs xenstore it calls back into trio with ``trio.from_thread.run``.  The QMP socket and
its sessions are :mod:`.monitor`; the handles device code calls are :mod:`.xen_operations`.

Start-up follows QEMU with Xen: open the connections, create the ioreq server, build the
machine (mapcache, ``xen_read_physmap``, devices), open QMP, then run the incoming load if
``--incoming`` was given.  ``--restrict`` (-xen-domid-restrict) follows ``--qemu-version``:
QEMU 2.10 calls ``xen_restrict`` in ``xen_hvm_init`` right after opening xenstore, before the
machine is built, and restricts only the devicemodel and foreignmemory handles; from 3.0 the
accelerator's ``setup_post`` calls ``xentoolcore_restrict_all``, which also closes xenstore.
When the machine runs, the device model writes ``running`` to its state node
(``xenstore_record_dm_state``) and exits with "error recording dm state" if it cannot; from
3.0 a restricted device model does not register that write at all.

Three hypervisor connections stand for QEMU's handles: ``privcmd`` is the foreignmemory handle
(the mapcache's mappings), ``xc`` the libxenctrl handle (relocation, cache attributes,
populate) and the trio client the devicemodel handle (ioreqs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

from hypervisor_sim.client import HypervisorClient
from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenhost import RunDir
from xenstored_sim.client import open_xenstore

from . import qmp
from .errors import LoadError, QemuExit
from .machine import Machine, RunState
from .monitor import QmpMonitor
from .ui import console, vnc
from .version import QemuVersion
from .xen_hvm import MODES, Mode
from .xen_native import xen_restrict
from .xen_operations import (
    DeviceModelHandles,
    PrivcmdHypercalls,
    XenStoreBridge,
    open_hypervisor_or_exit,
)
from .xenforeignmemory import ForeignMemory

log = logging.getLogger("qemu_model")
DEFAULT_VERSION = QemuVersion()


@dataclass(frozen=True)
class Config:
    domid: int
    xen_mode: str  # new | compat | pointer-fixup | auto
    vga: str
    rundir: Path
    xenstore_path: str
    incoming: str | None  # a file, "defer", or None
    restrict: bool
    start_paused: bool
    memory_mib: int
    vram_mib: int
    qemu_version: QemuVersion = DEFAULT_VERSION
    vnc: vnc.VncAddress | None = None
    #: The hypercall socket: ``RUNDIR/hypervisor.sock`` unless the toolstack gave the device
    #: models one of their own (``--hypervisor``).
    hypervisor: Path | None = None

    @property
    def hypervisor_path(self) -> Path:
        return self.hypervisor or RunDir(self.rundir).hypervisor_socket

    @property
    def qmp_path(self) -> Path:
        return RunDir(self.rundir).qmp_socket(self.domid)


def resolve_mode(requested: str, has_map2: bool) -> Mode:
    """``auto`` is what QEMU's configure chose: new with map2 (libs ≥ 4.10), else compat."""
    if requested == "auto":
        return "new" if has_map2 else "compat"
    for mode in MODES:
        if mode == requested:
            return mode
    raise ValueError(f"unknown xen mode {requested!r}")


class DeviceModel:
    """One running device model; :meth:`run` is the whole life of the process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.bql = trio.Lock()
        self.machine: Machine | None = None
        self.mode: Mode | None = None
        self.autostart = not cfg.start_paused
        self._hv: HypervisorClient | None = None
        self._privcmd: Privcmd | None = None
        self._xc: Privcmd | None = None
        self._restricted_early: tuple[str, ...] = ()
        self._xs_bridge: XenStoreBridge | None = None
        self._quit = trio.Event()
        self.monitor = QmpMonitor(cfg.qmp_path, self._execute, self._quit)
        self._fatal: BaseException | None = None
        self._vnc: vnc.VncServer | None = None

    # ----------------------------------------------------------------------------------------
    # Life cycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        try:
            async with open_hypervisor_or_exit(cfg.hypervisor_path) as hv:
                self._hv = hv
                self.mode = resolve_mode(cfg.xen_mode, bool((await hv.version())["has_map2"]))
                self._privcmd = await trio.to_thread.run_sync(Privcmd, cfg.hypervisor_path)
                self._xc = await trio.to_thread.run_sync(Privcmd, cfg.hypervisor_path)
                await hv.ioreq_server_create(cfg.domid)
                async with contextlib.AsyncExitStack() as xs_stack:
                    try:
                        xs = await xs_stack.enter_async_context(open_xenstore(cfg.xenstore_path))
                    except OSError as exc:
                        raise QemuExit(
                            f"xen: could not open xenstore at {cfg.xenstore_path}: {exc}"
                        ) from None
                    self._xs_bridge = XenStoreBridge(xs, trio.lowlevel.current_trio_token())
                    if cfg.restrict and not cfg.qemu_version.restrict_all:
                        await self._restrict_2_10()
                    await self._init_machine()
                    if cfg.restrict and cfg.qemu_version.restrict_all:
                        await self._restrict()
                        await xs_stack.aclose()  # dm_restrict: no xenstore after setup_post
                    async with trio.open_nursery() as nursery:
                        await nursery.start(self.monitor.serve)
                        if cfg.vnc is not None:
                            await nursery.start(self._serve_vnc, cfg.vnc)
                        nursery.start_soon(self._serve_ioreqs, hv)
                        task_status.started()
                        await self._start()
                        await self._quit.wait()
                        nursery.cancel_scope.cancel()
        finally:
            self._shutdown()

    async def _init_machine(self) -> None:
        cfg = self.cfg
        assert self._privcmd is not None and self._xc is not None and self.mode is not None
        privcmd, xc, mode, bridge = self._privcmd, self._xc, self.mode, self._xs_bridge

        def build() -> Machine:
            return Machine(
                domid=cfg.domid,
                mode=mode,
                device=cfg.vga,
                ram_size=cfg.memory_mib << 20,
                vram_size=cfg.vram_mib << 20,
                fmem=ForeignMemory(privcmd),
                hypercalls=PrivcmdHypercalls(xc),
                dirty=PrivcmdHypercalls(xc),
                xenstore=bridge,
                incoming=cfg.incoming is not None,
                version=cfg.qemu_version,
                restricted_handles=self._restricted_early,
            )

        try:
            self.machine = await trio.to_thread.run_sync(build)
        except HypercallError as exc:
            raise QemuExit(f"xen: machine init failed: {exc}") from None
        log.info(
            "machine up: mode=%s device=%s vram_ptr=%#x",
            mode,
            cfg.vga,
            self.machine.device.vga.vram_ptr or 0,
        )

    def _handles(self) -> DeviceModelHandles:
        assert self._privcmd is not None and self._xc is not None and self._hv is not None
        return DeviceModelHandles(self._privcmd, self._xc, self._hv)

    async def _restrict_2_10(self) -> None:
        """QEMU 2.10 ``xen_hvm_init``: ``xen_restrict`` right after ``xs_daemon_open``."""
        assert self.mode is not None
        version, compat, domid = self.cfg.qemu_version, self.mode == "compat", self.cfg.domid
        handles = self._handles()
        rc, restricted = await trio.to_thread.run_sync(
            xen_restrict, version, compat, domid, handles
        )
        if rc < 0:
            raise QemuExit(f"failed to restrict: error {-rc}", 1)
        self._restricted_early = restricted
        log.info("restricted to domain %d: %s", domid, ", ".join(restricted) or "nothing")

    async def _restrict(self) -> None:
        """``xen_setup_post`` → ``xentoolcore_restrict_all`` (QEMU 3.0 and later)."""
        assert self.machine is not None
        await trio.to_thread.run_sync(self.machine.restrict, self._handles())
        if self._xs_bridge is not None:
            self._xs_bridge.close()
        log.info("restricted to domain %d; xenstore closed", self.cfg.domid)

    async def _start(self) -> None:
        incoming = self.cfg.incoming
        if incoming is not None and incoming != "defer":
            try:
                data = await trio.Path(incoming).read_bytes()
            except OSError as exc:
                raise QemuExit(
                    f"load of migration failed: cannot read {incoming}: {exc.strerror}"
                ) from None
            try:
                await self._load(data)
            except LoadError as exc:
                raise QemuExit(f"load of migration failed: {exc}") from None
            return
        if incoming is None and self.autostart:
            await self._set_running()

    def _shutdown(self) -> None:
        self.monitor.remove()
        vnc.unlink_unix(self.cfg.vnc)
        if self.machine is not None:
            self.machine.close()
        if self._privcmd is not None:
            self._privcmd.close()
        if self._xc is not None:
            self._xc.close()

    # ----------------------------------------------------------------------------------------
    # Run states

    @property
    def runstate(self) -> RunState:
        assert self.machine is not None
        return self.machine.runstate

    async def _set_runstate(self, state: RunState) -> None:
        assert self.machine is not None
        was_running = self.machine.runstate == "running"
        self.machine.runstate = state
        if was_running and state != "running":
            self.monitor.broadcast(qmp.event("STOP"))
        elif state == "running" and not was_running:
            self.monitor.broadcast(qmp.event("RESUME"))
            await self._record_dm_state()

    async def _set_running(self) -> None:
        await self._set_runstate("running")

    async def _record_dm_state(self) -> None:
        """``xen_change_state_handler`` → ``xenstore_record_dm_state`` (hw/xen/xen-common.c).

        From QEMU 3.0 the handler is not registered under -xen-domid-restrict; otherwise a
        failed write makes QEMU exit.
        """
        if self.machine is None:
            return
        if self.cfg.restrict and self.cfg.qemu_version.skip_state_write_when_restricted:
            return
        # Relative, as QEMU writes it: xenstored puts it under this connection's home, dom0's
        # tree for a dom0 device model and the stub's own tree for a stub domain.
        path = f"device-model/{self.cfg.domid}/state"
        bridge = self._xs_bridge
        ok = bridge is not None and await trio.to_thread.run_sync(bridge.write, path, "running")
        if not ok:
            raise QemuExit("error recording dm state", 1)

    async def _load(self, data: bytes) -> None:
        assert self.machine is not None
        machine = self.machine
        async with self.bql:
            was_incoming = machine.in_migrate()
            await trio.to_thread.run_sync(machine.load_devices_state, data)
        if was_incoming:
            # process_incoming_migration_bh: run if autostart, else stay paused.
            if self.autostart:
                await self._set_running()
            else:
                await self._set_runstate("paused")

    # ----------------------------------------------------------------------------------------
    # ioreqs

    async def _serve_ioreqs(self, hv: HypervisorClient) -> None:
        assert self.machine is not None
        machine = self.machine
        try:
            async for req in hv.ioreqs():
                async with self.bql:
                    value = await trio.to_thread.run_sync(
                        machine.handle_ioreq, req.type, req.dir, req.addr, req.size, req.data
                    )
                await hv.ioreq_complete(req.seq, value if req.dir == "read" else 0)
        except HypervisorDisconnected:
            raise QemuExit("xen: lost the connection to the hypervisor") from None

    # ----------------------------------------------------------------------------------------
    # QMP commands (the monitor itself is :mod:`.monitor`)

    async def _execute(self, cmd: qmp.Command) -> Any:
        """Run one QMP command through :attr:`QMP_COMMANDS` (cf. QEMU's qmp_dispatch())."""
        assert self.machine is not None
        handler = self.QMP_COMMANDS.get(cmd.name)
        if handler is None:
            raise qmp.QmpError(f"The command {cmd.name} has not been found", "CommandNotFound")
        return await handler(self, self.machine, cmd)

    async def _cmd_query_status(self, machine: Machine, cmd: qmp.Command) -> Any:
        state = machine.runstate
        return {"status": state, "running": state == "running", "singlestep": False}

    async def _cmd_stop(self, machine: Machine, cmd: qmp.Command) -> Any:
        if state_is(machine, "inmigrate"):
            self.autostart = False
        elif state_is(machine, "running"):
            await self._set_runstate("paused")
        return {}

    async def _cmd_cont(self, machine: Machine, cmd: qmp.Command) -> Any:
        if state_is(machine, "inmigrate"):
            self.autostart = True
        elif not state_is(machine, "running"):
            await self._set_running()
        return {}

    async def _cmd_quit(self, machine: Machine, cmd: qmp.Command) -> Any:
        return {}

    async def _cmd_physmap_info(self, machine: Machine, cmd: qmp.Command) -> Any:
        async with self.bql:
            info: dict[str, Any] = await trio.to_thread.run_sync(machine.info)
        info["requested_mode"] = self.cfg.xen_mode
        return info

    async def _cmd_vram_dirty(self, machine: Machine, cmd: qmp.Command) -> Any:
        async with self.bql:
            return await trio.to_thread.run_sync(
                vram_dirty_command, machine, cmd.name, cmd.arguments
            )

    async def _cmd_save_devices_state(self, machine: Machine, cmd: qmp.Command) -> Any:
        return await self._save(cmd.arguments["filename"])

    async def _cmd_screendump(self, machine: Machine, cmd: qmp.Command) -> Any:
        return await self._screendump(cmd.arguments)

    async def _cmd_query_vnc(self, machine: Machine, cmd: qmp.Command) -> Any:
        return {"enabled": False} if self._vnc is None else self._vnc.info()

    async def _cmd_load_devices_state(self, machine: Machine, cmd: qmp.Command) -> Any:
        if state_is(machine, "running"):
            raise qmp.QmpError("Cannot update device state while vm is running")
        filename = cmd.arguments["filename"]
        try:
            data = await trio.Path(filename).read_bytes()
        except OSError as exc:
            raise qmp.QmpError(f"Could not open '{filename}': {exc.strerror}") from None
        try:
            await self._load(data)
        except LoadError as exc:
            raise qmp.QmpError(f"load of device state failed: {exc}") from None
        return {}

    #: The QMP commands by name (cf. QEMU's qmp-commands registry, qapi/qmp-registry.c).
    QMP_COMMANDS: ClassVar[
        Mapping[str, Callable[[DeviceModel, Machine, qmp.Command], Awaitable[Any]]]
    ] = {
        "query-status": _cmd_query_status,
        "stop": _cmd_stop,
        "cont": _cmd_cont,
        "quit": _cmd_quit,
        "x-physmap-info": _cmd_physmap_info,
        "xen-set-global-dirty-log": _cmd_vram_dirty,
        "x-vram-dirty": _cmd_vram_dirty,
        "xen-save-devices-state": _cmd_save_devices_state,
        "screendump": _cmd_screendump,
        "query-vnc": _cmd_query_vnc,
        "xen-load-devices-state": _cmd_load_devices_state,
    }

    async def _save(self, filename: str) -> dict[str, Any]:
        assert self.machine is not None
        machine = self.machine
        was_running = state_is(machine, "running")
        if was_running:
            await self._set_runstate("save-vm")
        try:
            async with self.bql:
                data = await trio.to_thread.run_sync(machine.save_devices_state)
            try:
                await trio.Path(filename).write_bytes(data)
            except OSError as exc:
                raise qmp.QmpError(f"Could not open '{filename}': {exc.strerror}") from None
        finally:
            if was_running:
                await self._set_running()
        return {}

    # ----------------------------------------------------------------------------------------
    # Display: screendump and VNC

    async def surface(self) -> console.Surface:
        """What the VGA device shows now, read through its own pointers under the lock."""
        assert self.machine is not None
        device = self.machine.device
        async with self.bql:
            return await trio.to_thread.run_sync(console.device_surface, device)

    async def _screendump(self, args: dict[str, Any]) -> dict[str, Any]:
        """``qmp_screendump`` (ui/ui-qmp-cmds.c): the file is written by this process."""
        assert self.machine is not None
        fmt = console.screendump_format(args, self.machine.device_kind)
        surface = await self.surface()
        data = await trio.to_thread.run_sync(console.IMAGE_FORMATS[fmt], surface)
        filename = args["filename"]
        try:
            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise qmp.QmpError(f"failed to open file '{filename}': {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                await trio.to_thread.run_sync(f.write, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(filename)
            raise qmp.QmpError(f"failed to save {fmt.upper()}: {exc.strerror}") from None
        return {}

    async def _serve_vnc(
        self,
        addr: vnc.VncAddress,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            listener, bound = await vnc.open_vnc_listener(addr)
        except OSError as exc:
            raise QemuExit(f"Failed to start VNC server: {exc.strerror or exc}") from None
        log.info("vnc: listening on %s", bound)
        server = vnc.VncServer(f"QEMU (dom{self.cfg.domid})", self.surface)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            self._vnc = server
            task_status.started()


def vram_dirty_command(machine: Machine, name: str, args: dict[str, Any]) -> Any:
    """``xen-set-global-dirty-log`` (what libxl sends around a live save) and the project's
    ``x-vram-dirty``: the framebuffer pages changed since the last ask (dirty_vram.py)."""
    dv = machine.dirty_vram
    if name == "xen-set-global-dirty-log":
        if args["enable"]:
            dv.log_global_start()
        else:
            dv.log_global_stop()
        return {}
    start = None if dv.logging is None else dv.logging[0]
    return {"start_addr": start, "page_size": 4096, "pages": dv.get_and_clear()}


def state_is(machine: Machine, state: RunState) -> bool:
    return machine.runstate == state


async def serve(
    cfg: Config, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the device model until ``quit``, SIGTERM or SIGINT; started once QMP accepts."""
    dm = DeviceModel(cfg)
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        try:
            await dm.run(task_status=task_status)
        finally:
            nursery.cancel_scope.cancel()

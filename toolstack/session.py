"""The toolstack's audited session: errors, the run directory and every xenstore, hypervisor
and QMP call the domain operations make.

:class:`Session` holds one xenstore and one hypervisor connection and the audit log
(``RUNDIR/audit/toolstack.jsonl``, :mod:`toolstack.audit`).  The libxl files
(:mod:`toolstack.libxl`) and the stub-domain builder (:mod:`toolstack.stubdom`) both act through
it, as libxl's files all act through the ``libxl_ctx`` (tools/libs/light/libxl_internal.h).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import xenhost
from hypervisor_sim.client import HypervisorClient
from hypervisor_sim.protocol import HypercallError
from xenhost.rundir import principal_socket
from xenstored_sim.client import XsClient
from xenstored_sim.wire import XsError

from .audit import Audit
from .qmp import QmpClient, QmpError, QmpProtocolError, open_qmp

T = TypeVar("T")


class ToolstackError(Exception):
    """A command failed; the message says what happened and what state was left."""


class DeviceModelError(ToolstackError):
    """The device model died, failed or never became ready."""


# --------------------------------------------------------------------------------------------
# Run directory


@dataclass(frozen=True, slots=True)
class RunDir:
    root: Path
    xenstore_socket: str
    #: The per-principal sockets the host's launcher made (``$PHYSMAP_LAB_PRINCIPALS``):
    #: ``<dir>/<principal>/socket`` and ``hypervisor.sock``; None when every client shares the
    #: host's two sockets (docs/architecture.md, "Principals in the audit logs").
    principals: Path | None = None

    @property
    def hypervisor_socket(self) -> Path:
        if self.principals is not None:
            return principal_socket(self.principals, "toolstack", "hypervisor")
        return xenhost.RunDir(self.root).hypervisor_socket

    @property
    def dm_xenstore_socket(self) -> str:
        """The xenstore socket a device model in dom0 is given (``--xenstore``)."""
        if self.principals is not None:
            return str(principal_socket(self.principals, "device-model", "xenstored"))
        return self.xenstore_socket

    @property
    def dm_hypervisor_socket(self) -> Path:
        """The hypercall socket a device model is given (``--hypervisor``)."""
        if self.principals is not None:
            return principal_socket(self.principals, "device-model", "hypervisor")
        return xenhost.RunDir(self.root).hypervisor_socket

    def qmp(self, domid: int) -> Path:
        return xenhost.RunDir(self.root).qmp_socket(domid)

    def dm_log(self, domid: int) -> Path:
        return xenhost.RunDir(self.root).dm_log(domid)

    @property
    def lib(self) -> Path:
        """Stands for XEN_LIB_DIR (/var/lib/xen)."""
        return self.root / "lib"

    def save_state(self, domid: int) -> Path:
        # LIBXL_DEVICE_MODEL_SAVE_FILE.<domid>
        return self.lib / f"qemu-save.{domid}"

    def resume_state(self, domid: int) -> Path:
        # LIBXL_DEVICE_MODEL_RESTORE_FILE.<domid>
        return self.lib / f"qemu-resume.{domid}"

    def userdata(self, domid: int, uuid: str) -> Path:
        # libxl__userdata_path: where libxl keeps the domain's configuration as JSON.
        return self.lib / f"userdata-d.{domid}.{uuid}.libxl-json"

    def userdata_files(self, domid: int) -> list[Path]:
        return sorted(self.lib.glob(f"userdata-d.{domid}.*.libxl-json"))


def rundir_from(root: str | os.PathLike[str]) -> RunDir:
    """The run directory, with the xenstore socket found as libxenstore finds it
    (``XENSTORED_PATH`` first), unless the launcher gave the toolstack its own sockets."""
    path = Path(root).resolve()
    principals = os.environ.get("PHYSMAP_LAB_PRINCIPALS")
    if principals:
        own = Path(principals).resolve()
        return RunDir(path, str(principal_socket(own, "toolstack", "xenstored")), own)
    return RunDir(
        path, os.environ.get("XENSTORED_PATH") or str(xenhost.RunDir(path).xenstored_socket)
    )


class Session:
    """One xenstore, one hypervisor connection and the audit log; every call through them is
    audited (cf. libxl's ``libxl__gc``/``CTX`` handles that each libxl file is passed)."""

    def __init__(self, run: RunDir, xs: XsClient, hv: HypervisorClient, audit: Audit) -> None:
        self.run = run
        self.xs = xs
        self.hv = hv
        self.audit = audit

    # ---------------------------------------------------------------- audited primitives

    async def hv_call(self, call: str, **args: Any) -> Any:
        domid = args.get("domid")
        try:
            result = await self.hv.call(call, **args)
        except HypercallError as exc:
            self.audit.record("hypercall", exc.errno_name, call=call, domid=domid)
            raise
        self.audit.record("hypercall", call=call, domid=domid)
        return result

    async def xs_call(self, action: str, path: str, op: Awaitable[T], *, tx: bool = False) -> T:
        try:
            result = await op
        except XsError as exc:
            self.audit.record(f"xs_{action}", exc.errno_name, path=path, tx=tx or None)
            raise
        self.audit.record(f"xs_{action}", path=path, tx=tx or None)
        return result

    async def xs_read(self, path: str) -> str | None:
        """A node's value, ``None`` if it does not exist."""
        try:
            raw = await self.xs_call("read", path, self.xs.read(path))
        except XsError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise
        return raw.decode("utf-8", "replace")

    async def xs_write(self, path: str, value: str) -> None:
        await self.xs_call("write", path, self.xs.write(path, value))

    async def xs_rm(self, path: str) -> None:
        """Remove a subtree; a missing one is fine."""
        try:
            await self.xs_call("rm", path, self.xs.rm(path))
        except XsError as exc:
            if exc.errno_name != "ENOENT":
                raise

    async def xs_directory(self, path: str) -> list[str]:
        try:
            return await self.xs_call("directory", path, self.xs.directory(path))
        except XsError as exc:
            if exc.errno_name == "ENOENT":
                return []
            raise

    async def qmp_call(self, q: QmpClient, domid: int, command: str, **args: Any) -> Any:
        try:
            result = await q.execute(command, args or None)
        except QmpError as exc:
            self.audit.record("qmp", exc.error_class, call=command, domid=domid)
            raise
        except QmpProtocolError:
            self.audit.record("qmp", "disconnected", call=command, domid=domid)
            raise
        self.audit.record("qmp", call=command, domid=domid)
        return result

    @asynccontextmanager
    async def qmp_session(self, domid: int) -> AsyncIterator[QmpClient]:
        path = self.run.qmp(domid)
        try:
            async with open_qmp(path) as q:
                self.audit.record("qmp_connect", call=str(path), domid=domid)
                yield q
        except QmpProtocolError as exc:
            raise DeviceModelError(
                f"the device model of domain {domid} does not answer on QMP: {exc}"
            ) from None

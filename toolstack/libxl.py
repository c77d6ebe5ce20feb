"""Domain operations: the trio shell of the toolstack, in the steps libxl takes.

``async with open_libxl(rundir, command="create") as lx:`` connects to xenstored-sim and
hypervisor-sim; :class:`Libxl` then creates, lists, pauses, saves, restores and destroys
domains, spawning ``qemu-model`` as the device model and speaking QMP to it.  Every xenstore,
hypervisor, QMP and process action is written to ``RUNDIR/audit/toolstack.jsonl``
(:mod:`toolstack.audit`).

Failures raise :class:`ToolstackError` with a message meant for the user; a create or restore
that fails part-way undoes everything it made before the error is raised.
"""

from __future__ import annotations

import os
import signal
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from hypervisor_sim.client import HypervisorClient, open_hypervisor
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenstored_sim.client import Transaction, XsClient, XsDisconnected, open_xenstore
from xenstored_sim.wire import LocalProtocolError, XsError

from . import devicemodel, stubdom
from .audit import Audit
from .config import DomainConfig, Flavour
from .emulator_xenstore import PHYSMAP_FIELDS, XenstoreDataError, dm_root, physmap_pairs
from .image import (
    ImageIndex,
    WriteSummary,
    copy_emulator_context,
    read_image,
    restore_pages,
    save_image,
)
from .memory_stream import PAGE_SHIFT, PAGE_SIZE
from .qmp import QmpClient, QmpError, QmpProtocolError, open_qmp
from .streamio import StreamError

T = TypeVar("T")

#: libxl's LIBXL_DEVICE_MODEL_START_TIMEOUT, in seconds.
DM_START_TIMEOUT: Final = 60.0
#: libxl's LIBXL_MAXMEM_CONSTANT: 1 MiB of slack on top of RAM and video memory.
MAXMEM_SLACK_PAGES: Final = 1024 * 1024 // PAGE_SIZE
#: The HVM xenstore ring's special page and event channel handed to INTRODUCE.
STORE_GFN: Final = 0xFEFFE
STORE_PORT: Final = 1
#: gfns per populate/map call, well inside hypervisor-sim's frame limit.
GFN_CHUNK: Final = 1 << 18
#: How long a stopping device model gets after QMP quit, then after SIGTERM.
DM_QUIT_GRACE: Final = 3.0
DM_TERM_GRACE: Final = 3.0
#: Bound on cleanup work that runs shielded from cancellation.
CLEANUP_BOUND: Final = 20.0
#: How long a rollback waits for a xenstored that went away to accept connections again.
XS_RECONNECT_BOUND: Final = 5.0


class ToolstackError(Exception):
    """A command failed; the message says what happened and what state was left."""


class DeviceModelError(ToolstackError):
    """The device model died, failed or never became ready."""


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
            return self.principals / "toolstack" / "hypervisor.sock"
        return self.root / "hypervisor.sock"

    @property
    def dm_xenstore_socket(self) -> str:
        """The xenstore socket a device model in dom0 is given (``--xenstore``)."""
        if self.principals is not None:
            return str(self.principals / "device-model" / "socket")
        return self.xenstore_socket

    @property
    def dm_hypervisor_socket(self) -> Path:
        """The hypercall socket a device model is given (``--hypervisor``)."""
        if self.principals is not None:
            return self.principals / "device-model" / "hypervisor.sock"
        return self.root / "hypervisor.sock"

    def qmp(self, domid: int) -> Path:
        return self.root / "qmp" / f"{domid}.sock"

    def dm_log(self, domid: int) -> Path:
        return self.root / "dm" / f"{domid}.log"

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
        return RunDir(path, str(own / "toolstack" / "socket"), own)
    return RunDir(path, os.environ.get("XENSTORED_PATH") or str(path / "socket"))


# --------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class DomainSummary:
    domid: int
    name: str
    paused: bool
    tot_pages: int
    max_pages: int
    memory_mib: int | None
    vga: str | None
    dm_mode: str | None
    dm_restrict: bool | None
    toolstack: str | None
    dm_pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class CreateResult:
    domid: int
    name: str
    uuid: str
    dm_pid: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class SaveResult:
    domid: int
    file: str
    records: list[str]
    bytes: int
    pages: int
    xenstore_keys: dict[str, str]
    checkpoint: bool
    seconds: float
    #: Seconds spent in each step, in order (:class:`_Clock`).
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class RestoreResult:
    domid: int
    name: str
    records: list[str]
    bytes: int
    pages: int
    xenstore_keys: dict[str, str]
    xenstore_keys_ignored: bool
    dm_pid: int
    seconds: float
    #: Seconds spent in each step, in order (:class:`_Clock`).
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Made:
    """What a create or restore has made so far, for the rollback."""

    domid: int | None = None
    uuid: str | None = None
    tree: bool = False
    introduced: bool = False
    dm_pid: int | None = None
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Memory copies (run in a worker thread: they are plain file I/O)


class _Clock:
    """Wall time per named step of a save or restore, reported as its ``phases``."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, step: str) -> None:
        """Charge the time since the previous mark to ``step``."""
        now = time.monotonic()
        self.phases[step] = self.phases.get(step, 0.0) + now - self._last
        self._last = now


def _expand(runs: list[list[int]]) -> list[int]:
    return [gfn for first, count in runs for gfn in range(first, first + count)]


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


# --------------------------------------------------------------------------------------------
# The toolstack


class Libxl:
    """The toolstack's domain operations over one xenstore and one hypervisor connection."""

    def __init__(self, run: RunDir, xs: XsClient, hv: HypervisorClient, audit: Audit) -> None:
        self.run = run
        self.xs = xs
        self.hv = hv
        self.audit = audit
        #: How long a device model may take to become ready (libxl's spawn timeout).
        self.dm_start_timeout = DM_START_TIMEOUT

    # ---------------------------------------------------------------- audited primitives

    async def _hv(self, call: str, **args: Any) -> Any:
        domid = args.get("domid")
        try:
            result = await self.hv.call(call, **args)
        except HypercallError as exc:
            self.audit.record("hypercall", exc.errno_name, call=call, domid=domid)
            raise
        self.audit.record("hypercall", call=call, domid=domid)
        return result

    async def _xs(self, action: str, path: str, op: Awaitable[T], *, tx: bool = False) -> T:
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
            raw = await self._xs("read", path, self.xs.read(path))
        except XsError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise
        return raw.decode("utf-8", "replace")

    async def xs_write(self, path: str, value: str) -> None:
        await self._xs("write", path, self.xs.write(path, value))

    async def xs_rm(self, path: str) -> None:
        """Remove a subtree; a missing one is fine."""
        try:
            await self._xs("rm", path, self.xs.rm(path))
        except XsError as exc:
            if exc.errno_name != "ENOENT":
                raise

    async def xs_directory(self, path: str) -> list[str]:
        try:
            return await self._xs("directory", path, self.xs.directory(path))
        except XsError as exc:
            if exc.errno_name == "ENOENT":
                return []
            raise

    async def _qmp(self, q: QmpClient, domid: int, command: str, **args: Any) -> Any:
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
    async def _qmp_session(self, domid: int) -> AsyncIterator[QmpClient]:
        path = self.run.qmp(domid)
        try:
            async with open_qmp(path) as q:
                self.audit.record("qmp_connect", call=str(path), domid=domid)
                yield q
        except QmpProtocolError as exc:
            raise DeviceModelError(
                f"the device model of domain {domid} does not answer on QMP: {exc}"
            ) from None

    # ---------------------------------------------------------------- lookups

    async def domain_info(self, domid: int) -> dict[str, Any]:
        try:
            info: dict[str, Any] = await self._hv("domain_getinfo", domid=domid)
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
        infos: list[dict[str, Any]] = await self._hv("domain_list")
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

    async def _pick_name(self, config: DomainConfig) -> str:
        names = {str(d["name"]) for d in await self._hv("domain_list")}
        if config.name is not None:
            # libxl__domain_rename refuses a name another domain already has.
            if config.name in names:
                raise ToolstackError(f"a domain named {config.name!r} already exists")
            return config.name
        n = 1
        while f"guest-{n}" in names:
            n += 1
        return f"guest-{n}"

    # ---------------------------------------------------------------- building a domain

    @staticmethod
    def max_pages(config: DomainConfig) -> int:
        """RAM plus video memory plus libxl's slack (xc_domain_setmaxmem in libxl_dom.c)."""
        return ((config.memory_mib + config.video_mib) << 20 >> PAGE_SHIFT) + MAXMEM_SLACK_PAGES

    async def _populate(self, domid: int, gfns: list[int]) -> None:
        for i in range(0, len(gfns), GFN_CHUNK):
            await self._hv("populate_physmap", domid=domid, gfns=gfns[i : i + GFN_CHUNK])

    async def _map_foreign(self, domid: int, gfns: list[int]) -> tuple[str, list[int]]:
        mem_path = ""
        offsets: list[int] = []
        for i in range(0, len(gfns), GFN_CHUNK):
            chunk = gfns[i : i + GFN_CHUNK]
            fm = await self._hv("map_foreign", domid=domid, gfns=chunk)
            for gfn, off, err in zip(chunk, fm["offsets"], fm["errors"], strict=True):
                if err or off < 0:
                    raise ToolstackError(f"cannot map gfn 0x{gfn:x} of domain {domid}: {err}")
            mem_path = fm["mem_path"]
            offsets.extend(fm["offsets"])
        return mem_path, offsets

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
                    await self._xs("rm", path, t.rm(path), tx=True)

            async def mknod(path: str, perms: list[str]) -> None:
                # libxl__xs_mknod: an empty node, then its permissions.
                await self._xs("write", path, t.write(path, ""), tx=True)
                await self._xs("set_perms", path, t.set_perms(path, perms), tx=True)

            async def write(path: str, value: str) -> None:
                await self._xs("write", path, t.write(path, value), tx=True)

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

    async def _build_post(self, domid: int, config: DomainConfig) -> None:
        """``libxl__build_post`` (libxl_dom.c): memory and store keys, then INTRODUCE."""
        dom = f"/local/domain/{domid}"
        entries = {
            "memory/static-max": str(config.memory_mib * 1024),
            "memory/target": str(config.memory_mib * 1024),
            "memory/videoram": str(config.video_mib * 1024),
            "domid": str(domid),
            "store/port": str(STORE_PORT),
            "store/ring-ref": str(STORE_GFN),
        }
        # image/device-model-domid is written only by libxl__spawn_stub_dm (libxl_dm.c);
        # libxl_get_stubdom_id reads it and takes a missing node for dom0.

        async def fill(t: Transaction) -> None:
            for key, value in entries.items():
                await self._xs("write", f"{dom}/{key}", t.write(f"{dom}/{key}", value), tx=True)

        await self.xs.run_transaction(fill)
        try:
            await self.xs.introduce(domid, STORE_GFN, STORE_PORT)
        except XsError as exc:
            self.audit.record("xs_introduce", exc.errno_name, domid=domid)
            raise
        self.audit.record("xs_introduce", domid=domid)

    def _store_userdata(self, domid: int, uuid: str, config: DomainConfig) -> Path:
        path = self.run.userdata(domid, uuid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(config.to_json())
        tmp.rename(path)
        self.audit.record("userdata_store", call=str(path), domid=domid)
        return path

    async def _start_domain(
        self, config: DomainConfig, name: str, made: _Made, *, restore: bool
    ) -> tuple[int, str]:
        # A restored domain keeps its uuid, as xl restore does from the saved config, unless
        # the saved domain still runs (a checkpoint restored beside it).
        uuid = config.uuid or str(uuidlib.uuid4())
        if any(self.run.lib.glob(f"userdata-d.*.{uuid}.libxl-json")):
            uuid = str(uuidlib.uuid4())
        made.uuid = uuid
        domid = int(
            (
                await self._hv(
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

    # ---------------------------------------------------------------- the device model

    async def _spawn_dm(
        self, config: DomainConfig, domid: int, made: _Made, *, incoming: Path | None
    ) -> int:
        # The device model's directory, made as libxl__spawn_local_dm does: a plain mkdir,
        # so it inherits /local/domain/0/device-model's permissions (dom0 only).
        root = dm_root(domid)
        await self._xs("mkdir", root, self.xs.mkdir(root))
        xenstore = self.run.dm_xenstore_socket
        dm_domid = 0
        if config.dm_stubdom:
            # The device model acts as its stub domain, on that domain's socket (§5.5).
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
        (self.run.root / "qmp").mkdir(parents=True, exist_ok=True)
        pid = devicemodel.spawn_detached(program, argv, log)
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
        for QMP ``query-status`` (qemu-physmap.md §2.4).  A device model that exits first, or
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
        # under the home of the device model's own connection (qemu-physmap.md §2.4): dom0's
        # tree for a dom0 device model, the stub's tree (made stub-owned, §5.5) otherwise.
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
                            status = await self._qmp(q, domid, "query-status")
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
                            await self._qmp(q, domid, "quit")
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

    # ---------------------------------------------------------------- create

    async def create(self, config: DomainConfig) -> CreateResult:
        """Build a domain, start its device model, wait for it and unpause the guest."""
        t0 = time.monotonic()
        name = await self._pick_name(config)
        made = _Made()
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
            async with self._qmp_session(domid) as q:
                await self._qmp(q, domid, "cont")
        await self._hv("domain_unpause", domid=domid)

    async def _rollback(self, made: _Made) -> None:
        """Undo a failed create or restore, shielded so that cancellation cannot stop it.

        If the failure took the xenstore connection with it, a fresh one is opened for the
        clean-up.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_BOUND):
            if made.domid is None:
                return
            self.audit.record("rollback", domid=made.domid)
            if self.xs.connected:
                errors = await self._teardown(made.domid, made.dm_pid, made.uuid)
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
                            errors = await self._teardown(made.domid, made.dm_pid, made.uuid)
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
            await self._teardown(made.domid, made.dm_pid, made.uuid)

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

    # ---------------------------------------------------------------- destroy

    async def destroy(self, domid: int) -> None:
        """Stop the device model, remove the domain's xenstore trees, release it, destroy it
        in the hypervisor and remove its files (``libxl__destroy_domid``)."""
        known = any(int(d["domid"]) == domid for d in await self._hv("domain_list"))
        has_tree = await self.xs_read(f"/local/domain/{domid}/name") is not None
        if not known and not has_tree and not self.run.userdata_files(domid):
            raise ToolstackError(f"domain {domid} does not exist")
        loaded = self.load_config(domid)
        errors = await self._teardown(domid, None, loaded[1] if loaded else None)
        if errors:
            raise ToolstackError(f"destroy of domain {domid} was incomplete: " + "; ".join(errors))

    async def _teardown(self, domid: int, pid: int | None, uuid: str | None) -> list[str]:
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
        with suppress(FileNotFoundError):
            self.run.qmp(domid).unlink()
        await step(f"remove {dom}", lambda: self.xs_rm(dom))
        vm_paths = {p for p in (vm, f"/vm/{uuid}" if uuid else None) if isinstance(p, str)}
        for path in sorted(vm_paths):
            if path.startswith("/vm/"):
                await step(f"remove {path}", partial(self.xs_rm, path))
        await step(f"remove /libxl/{domid}", lambda: self.xs_rm(f"/libxl/{domid}"))

        async def release() -> None:
            try:
                await self.xs.release(domid)
            except XsError as exc:
                # Not introduced yet (a create that failed early): nothing to release.
                self.audit.record("xs_release", exc.errno_name, domid=domid)
                return
            self.audit.record("xs_release", domid=domid)

        await step("release the domain in xenstore", release)

        async def hv_destroy() -> None:
            try:
                await self._hv("domain_destroy", domid=domid)
            except HypercallError as exc:
                if exc.errno_name not in ("ESRCH", "ENOENT", "EINVAL"):
                    raise

        await step("destroy the domain in the hypervisor", hv_destroy)
        # The device model's log stays, as xl keeps /var/log/xen/qemu-dm-NAME.log.
        files = [
            *self.run.userdata_files(domid),
            self.run.save_state(domid),
            self.run.resume_state(domid),
        ]
        for leftover in files:
            with suppress(FileNotFoundError):
                leftover.unlink()
        return errors

    # ---------------------------------------------------------------- pause / unpause

    async def pause(self, domid: int) -> None:
        """Pause the device model (QMP stop) and the guest, as ``libxl__domain_pause``."""
        await self.domain_info(domid)
        if await self.dm_pid(domid) is not None:
            async with self._qmp_session(domid) as q:
                await self._qmp(q, domid, "stop")
        await self._hv("domain_pause", domid=domid)

    async def unpause(self, domid: int) -> None:
        """Resume the device model (QMP cont) and unpause the guest.

        A device model that has died (killed during a save, say) has nothing to resume: the
        guest is unpaused without it, as the failed save's message promises."""
        await self.domain_info(domid)
        pid = await self.dm_pid(domid)
        if pid is not None and devicemodel.pid_alive(pid):
            async with self._qmp_session(domid) as q:
                await self._qmp(q, domid, "cont")
        elif pid is not None:
            self.audit.record("dm_gone", domid=domid, dm_pid=pid)
        await self._hv("domain_unpause", domid=domid)

    # ---------------------------------------------------------------- save

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
        clock = _Clock()
        await self.domain_info(domid)
        loaded = self.load_config(domid)
        if loaded is None:
            raise ToolstackError(
                f"domain {domid} was not built by this toolstack: no configuration"
            )
        config, uuid = loaded
        flavour = toolstack or config.toolstack
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        state = self.run.save_state(domid)
        state.parent.mkdir(parents=True, exist_ok=True)
        await self._hv("domain_pause", domid=domid)
        try:
            async with self._qmp_session(domid) as q:
                await self._qmp(q, domid, "stop")
                await self._qmp(q, domid, "xen-save-devices-state", filename=str(state), live=False)
            if not state.exists():
                raise DeviceModelError(f"the device model did not write its state to {state}")
            clock.mark("suspend")
            gfns = _expand(await self._hv("p2m", domid=domid))
            if not gfns:
                raise ToolstackError(f"domain {domid} has no memory to save")
            mem_path, offsets = await self._map_foreign(domid, gfns)
            clock.mark("map_foreign")
            pairs: list[tuple[str, str]] = []
            if flavour == "libxl":
                try:
                    pairs = await self.collect_xenstore_data(domid)
                except XenstoreDataError as exc:
                    raise ToolstackError(str(exc)) from None
            clock.mark("xenstore_data")
            summary = await trio.to_thread.run_sync(
                _write_image_file,
                tmp,
                config.with_overrides(uuid=uuid),
                gfns,
                offsets,
                mem_path,
                pairs,
                state,
            )
            clock.mark("memory")
            self.audit.record("image_write", call=str(tmp), domid=domid, bytes=summary.bytes)
            tmp.rename(final)
            self.audit.record("image_rename", call=str(final), domid=domid)
        except BaseException as exc:
            with suppress(FileNotFoundError):
                tmp.unlink()
            with suppress(FileNotFoundError):
                state.unlink()
            if isinstance(exc, Exception) and not isinstance(exc, trio.Cancelled):
                why = exc if isinstance(exc, ToolstackError) else f"{type(exc).__name__}: {exc}"
                raise ToolstackError(
                    f"save of domain {domid} failed: {why}. The domain is left paused; "
                    f"`xl-sim unpause {domid}` resumes it, `xl-sim destroy {domid}` removes it"
                ) from exc
            raise
        with suppress(FileNotFoundError):
            state.unlink()
        clock.mark("image")
        if checkpoint:
            async with self._qmp_session(domid) as q:
                await self._qmp(q, domid, "cont")
            await self._hv("domain_unpause", domid=domid)
            clock.mark("resume")
        else:
            await self.destroy(domid)
            clock.mark("destroy")
        return SaveResult(
            domid=domid,
            file=str(final),
            records=summary.records,
            bytes=summary.bytes,
            pages=len(gfns),
            xenstore_keys=dict(pairs),
            checkpoint=checkpoint,
            seconds=time.monotonic() - t0,
            phases=clock.phases,
        )

    # ---------------------------------------------------------------- restore

    async def restore(
        self,
        path: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        paused: bool = False,
    ) -> RestoreResult:
        """Check the whole image, then build the domain from it, plant the device model's
        xenstore keys (libxl flavour), start the device model on the saved state and
        unpause (unless ``paused``: ``xl migrate-receive`` restores paused and unpauses once
        the sender lets go).  On any failure everything made is removed again."""
        t0 = time.monotonic()
        clock = _Clock()
        image = Path(path)
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
        name = await self._pick_name(config)
        pfns = index.memory.pfns()
        planted: dict[str, str] = {}
        ignored = False
        made = _Made()
        try:
            clock.mark("index")
            domid, _ = await self._start_domain(config, name, made, restore=True)
            clock.mark("domain")
            await self._populate(domid, pfns)
            clock.mark("populate")
            mem_path, offsets = await self._map_foreign(domid, pfns)
            clock.mark("map_foreign")
            frames = dict(zip(pfns, offsets, strict=True))
            pages = await trio.to_thread.run_sync(_load_memory_file, image, index, frames, mem_path)
            clock.mark("memory")
            self.audit.record("memory_restore", call=str(image), domid=domid, pages=pages)
            if index.xenstore is not None and index.xenstore.pairs:
                if config.toolstack == "libxl":
                    # libxl__restore_emulator_xenstore_data: plain writes under the device
                    # model's root, before the device model exists (qemu-physmap.md §2.3, K5).
                    stub = await self.xs_read(f"/local/domain/{domid}/image/device-model-domid")
                    root = dm_root(domid, int(stub) if stub and stub.isdigit() else 0)
                    for key, value in index.xenstore.pairs:
                        # libxl ignores the result of each write (the audit keeps it).
                        try:
                            await self.xs_write(f"{root}/{key}", value)
                        except (XsError, LocalProtocolError):
                            continue
                        planted[key] = value
                else:
                    ignored = True
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
            name=name,
            records=index.records,
            bytes=index.size,
            pages=pages,
            xenstore_keys=planted,
            xenstore_keys_ignored=ignored,
            dm_pid=pid,
            seconds=time.monotonic() - t0,
            phases=clock.phases,
        )

    # ---------------------------------------------------------------- the guest

    async def guest_ops(self, domid: int, ops: list[dict[str, Any]]) -> list[Any]:
        result: list[Any] = await self._hv("guest", domid=domid, ops=ops)
        return result

    async def guest_driver(self, domid: int, action: str, params: Mapping[str, Any]) -> Any:
        device = self.domain_config(domid).vga
        return await self._hv(
            "guest_driver", domid=domid, device=device, action=action, params=dict(params)
        )


@asynccontextmanager
async def open_libxl(
    rundir: str | os.PathLike[str], *, command: str = "api"
) -> AsyncIterator[Libxl]:
    """Connect to the daemons of ``rundir``; ``command`` names the caller in the audit log."""
    run = rundir_from(rundir)
    async with AsyncExitStack() as stack:
        audit = Audit(run.root, command)
        stack.callback(audit.close)
        try:
            hv = await stack.enter_async_context(open_hypervisor(run.hypervisor_socket))
        except OSError as exc:
            raise ToolstackError(
                f"cannot reach hypervisor-sim at {run.hypervisor_socket}: {exc.strerror or exc}"
            ) from None
        try:
            xs = await stack.enter_async_context(open_xenstore(run.xenstore_socket))
        except OSError as exc:
            raise ToolstackError(
                f"cannot reach xenstored-sim at {run.xenstore_socket}: {exc.strerror or exc}"
            ) from None
        yield Libxl(run, xs, hv, audit)

"""``qemu-model``: the device model of one HVM domain, a real process.

::

    qemu-model --domid N [--xen-mode new|compat|pointer-fixup|auto] [--qemu-version 2.10|3.0|current]
               [--vga stdvga|cirrus|qxl]
               [--incoming FILE|defer] [--restrict] [-S] [--rundir DIR] [--xenstore PATH]
               [--hypervisor PATH]
               [--memory-mib M] [--vram-mib V] [--vnc HOST:N|:N|unix:PATH|none]
    qemu-model --hostile SCRIPT --domid N [--xenstore PATH] [--restrict] [--stubdom] ...

Exit status: 0 after ``quit`` or SIGTERM; 1 with a ``qemu-model: ...`` message when QEMU would
``exit(1)`` (a bad image for ``--incoming``, "xen: failed to restrict"); death by SIGABRT where
QEMU's assertions fail (the compat map2 shim, a failed in-place replacement).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenhost import RunDir
from xenstored_sim.ready import add_ready_fd_argument, notify_ready, ready_fd_from
from xenstored_sim.startup import OneLineParser, one_line

from .errors import QemuAbort, QemuExit
from .machine import DEVICES
from .server import Config, serve
from .ui.vnc import VncAddress, VncConfigError, parse_vnc
from .version import DEFAULT_QEMU_VERSION, QEMU_VERSIONS, QemuVersion

PROG = "qemu-model"


def build_parser() -> OneLineParser:
    """The options, grouped as QEMU's: the Xen machine, the host's sockets, memory, display."""
    p = OneLineParser(prog=PROG, description="A Xen HVM device model (QEMU, modelled).")
    _add_machine_arguments(p)
    _add_host_arguments(p)
    _add_memory_arguments(p)
    add_ready_fd_argument(p)
    p.add_argument(
        "--vnc",
        metavar="DISPLAY",
        help="VNC server as QEMU's -vnc: HOST:N or :N (TCP port 5900+N, ',to=L' tries up "
        "to display L), unix:PATH, or none",
    )
    return p


def _add_machine_arguments(p: OneLineParser) -> None:
    """The guest and how to model it: -xen-domid, the physmap mode, the QEMU, the card."""
    p.add_argument("--domid", type=int, required=True, help="the guest domain (-xen-domid)")
    p.add_argument(
        "--xen-mode",
        choices=["new", "compat", "pointer-fixup", "auto"],
        default="new",
        help="physmap handling: libs >= 4.10, XEN_COMPAT_PHYSMAP, the rejected pointer "
        "fix-up, or chosen from the hypervisor's library version",
    )
    p.add_argument(
        "--qemu-version",
        choices=QEMU_VERSIONS,
        default=DEFAULT_QEMU_VERSION,
        help="which QEMU to behave as: 2.10 (the release that merged the series, default), "
        "3.0 (xentoolcore_restrict_all) or current (docs/fidelity.md)",
    )
    p.add_argument(
        "--vga",
        choices=sorted(DEVICES),
        default="stdvga",
        help="the display card, as QEMU's -vga std/cirrus/qxl (default stdvga)",
    )
    p.add_argument(
        "--incoming",
        metavar="FILE",
        help="restore: load this device state ('defer': wait for xen-load-devices-state)",
    )
    p.add_argument("--restrict", action="store_true", help="dm_restrict: -xen-domid-restrict")
    p.add_argument("-S", dest="start_paused", action="store_true", help="do not start the guest")


def _add_host_arguments(p: OneLineParser) -> None:
    """Where the host's sockets are: the run directory, xenstore, the hypervisor."""
    p.add_argument(
        "--rundir",
        default=os.environ.get("PHYSMAP_LAB_RUNDIR"),
        help="the run directory: hypervisor.sock, qmp/DOMID.sock (default $PHYSMAP_LAB_RUNDIR)",
    )
    p.add_argument(
        "--xenstore",
        metavar="PATH",
        help="xenstore socket (default $XENSTORED_PATH, else RUNDIR/socket)",
    )
    p.add_argument(
        "--hypervisor",
        metavar="PATH",
        help="hypercall socket (default RUNDIR/hypervisor.sock)",
    )


def _add_memory_arguments(p: OneLineParser) -> None:
    """Guest RAM and video memory (-m, vgamem_mb)."""
    p.add_argument("--memory-mib", type=int, default=128, help="guest RAM: places ram_addr offsets")
    p.add_argument(
        "--vram-mib",
        type=int,
        default=16,
        help="video memory of the card in MiB, a power of two (QEMU's vgamem_mb; default 16)",
    )


def _check(p: OneLineParser, a: argparse.Namespace) -> VncAddress | None:
    """Refuse values argparse lets through, in one line each; the parsed ``--vnc``."""
    if not a.rundir:
        p.error("--rundir is required (or set PHYSMAP_LAB_RUNDIR)")
    if a.domid < 1:
        p.error("--domid must be a guest domain (>= 1)")
    if not 1 <= a.memory_mib <= 1 << 20:
        p.error("--memory-mib out of range")
    if not 1 <= a.vram_mib <= 256 or a.vram_mib & (a.vram_mib - 1):
        p.error("--vram-mib must be a power of two from 1 to 256")
    try:
        return None if a.vnc is None else parse_vnc(a.vnc)
    except VncConfigError as exc:
        p.error(str(exc))


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = build_parser()
    a = p.parse_args(argv)
    vnc = _check(p, a)
    rundir = Path(a.rundir)
    if not rundir.is_dir():
        p.error(f"--rundir {a.rundir}: no such directory")
    xenstore = (
        a.xenstore or os.environ.get("XENSTORED_PATH") or str(RunDir(rundir).xenstored_socket)
    )
    return Config(
        domid=a.domid,
        xen_mode=a.xen_mode,
        vga=a.vga,
        rundir=rundir,
        xenstore_path=xenstore,
        incoming=a.incoming,
        restrict=a.restrict,
        start_paused=a.start_paused,
        memory_mib=a.memory_mib,
        vram_mib=a.vram_mib,
        qemu_version=QemuVersion.parse(a.qemu_version),
        vnc=vnc,
        hypervisor=Path(a.hypervisor) if a.hypervisor else None,
    )


def _leaf(exc: BaseException) -> BaseException:
    """The one interesting exception inside nursery groups."""
    while isinstance(exc, BaseExceptionGroup):
        fatal = [e for e in exc.exceptions if isinstance(e, QemuAbort | QemuExit)]
        exc = fatal[0] if fatal else exc.exceptions[0]
    return exc


async def _serve(cfg: Config, ready_fd: int | None) -> None:
    """Serve; announce readiness once QMP accepts (what libxl waits for)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, cfg)
        notify_ready(PROG, str(cfg.qmp_path), ready_fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--hostile" or a.startswith("--hostile=") for a in args):
        from .hostile import run  # a compromised device model: the attacks, no devices

        return run.main(args)
    cfg = parse_args(argv)
    ready_fd = ready_fd_from(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"{PROG}[d{cfg.domid}]: %(message)s",
    )
    try:
        trio.run(_serve, cfg, ready_fd)
    except BaseException as group:
        exc = _leaf(group)
        if isinstance(exc, QemuAbort):
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            os.abort()
        if isinstance(exc, QemuExit):
            print(f"{PROG}: {exc.message}", file=sys.stderr, flush=True)
            return exc.status
        if isinstance(exc, HypervisorDisconnected | HypercallError | OSError):
            print(f"{PROG}: {one_line(exc)}", file=sys.stderr, flush=True)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

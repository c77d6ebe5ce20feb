"""``xl-sim``: the command line of the toolstack, shaped like ``xl`` (cf. Xen
tools/xl/xl_cmdtable.c and xl(1)).

::

    xl-sim [--rundir DIR] [--json] create [CONFIG] [--name N] [--memory MiB] [--vga V]
                                      [--videoram MiB] [--dm-mode M]
                                      [--dm-qemu-version V] [--dm-restrict]
                                      [--dm-stubdom [--dm-grant 'ACCESS PATH' ...]]
                                      [--toolstack libxl|unaware]
    xl-sim list [-l|--long] [DOMAIN]
    xl-sim info
    xl-sim pause|unpause|destroy DOMAIN
    xl-sim domid NAME | domname DOMID
    xl-sim save [-c|--checkpoint] [-p] [--toolstack F] DOMAIN FILE
    xl-sim restore [-p] [CONFIG] FILE [--name N] [--dm-mode M]
                                      [--dm-qemu-version V] [--dm-restrict |
                                      --no-dm-restrict] [--dm-stubdom | --no-dm-stubdom]
                                      [--dm-grant 'ACCESS PATH' ...] [--toolstack F]
    xl-sim migrate DOMAIN ADDRESS:PORT [--max-rounds N] [--dirty-threshold PAGES]
    xl-sim migrate-receive [--listen ADDRESS:PORT]
    xl-sim vncviewer DOMAIN
    xl-sim guest DOMAIN map-bar|set-mode|draw|fb-hash|xs-read|xs-write ...

A DOMAIN is a domain id or a name, as for xl.  CONFIG is a whole xl.cfg(5) file: the options
the simulated host models are used and each other xl.cfg option draws one warning.
``--rundir`` defaults to ``$PHYSMAP_LAB_RUNDIR``.  With ``--json`` every command prints one
JSON object on stdout, an error included (``{"error": ...}``); the exit status is 0 on
success, 1 on failure and 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from hypervisor_sim import guest_drivers
from hypervisor_sim.protocol import HypercallError, HypervisorDisconnected
from xenstored_sim.client import XsDisconnected
from xenstored_sim.startup import OneLineParser
from xenstored_sim.wire import XsError

from . import migrate, vncviewer, xl_info
from .config import (
    DM_MODES,
    DM_QEMU_VERSIONS,
    FLAVOURS,
    VGA_CHOICES,
    ConfigError,
    DomainConfig,
    ParsedConfig,
    parse_xl_cfg,
)
from .libxl import Libxl, ToolstackError, open_libxl
from .streamio import StreamError
from .xl_utils import domain_name, find_domain

PROG = "xl-sim"


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _count(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return value


def _address(text: str) -> tuple[str, int]:
    try:
        return migrate.parse_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _domain(text: str) -> int | str:
    """xl's ``<Domain>``: an id (1 or more: a guest) or a name, looked up once connected."""
    if not text.isdigit():
        if not text.strip():
            raise argparse.ArgumentTypeError("a domain is an id or a name")
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a guest domid is 1 or more (0 is the control domain)")
    return value


def _mode_args(p: argparse.ArgumentParser, *, seed: bool = False) -> None:
    p.add_argument("--width", type=_int, default=1024)
    p.add_argument("--height", type=_int, default=768)
    p.add_argument("--bpp", type=_int, default=32)
    p.add_argument(
        "--addr",
        type=_int,
        default=guest_drivers.DEFAULT_BAR_ADDR,
        help="the framebuffer BAR address (default 0xf0000000)",
    )
    if seed:
        p.add_argument("--seed", type=_int, required=True)


def _grant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dm-grant",
        dest="dm_grants",
        action="append",
        metavar="'ACCESS PATH'",
        help="with --dm-stubdom: a xenstore grant for the stub domain, such as "
        "'b /local/domain/0/device-model/$DOMID/physmap/*' (repeat; the default is none)",
    )
    p.add_argument(
        "--dm-no-grants",
        dest="dm_grants",
        action="store_const",
        const=[],
        help="with --dm-stubdom: grant the stub domain nothing",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = OneLineParser(
        prog=PROG, parents=[common], description="A toolstack for the simulated Xen host."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_create(sub, common)
    _add_queries(sub, common)
    _add_lifecycle(sub, common)
    _add_save_restore(sub, common)
    _add_migrate(sub, common)
    _add_guest(sub, common)
    return parser


def _common_options() -> OneLineParser:
    """The options every command takes, before or after its name."""
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--rundir",
        default=argparse.SUPPRESS,
        help="the run directory (default $PHYSMAP_LAB_RUNDIR)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object"
    )

    return common


def _add_create(sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser) -> None:
    """``create``: xl create, from an xl.cfg and the options that replace its settings."""
    p = sub.add_parser("create", parents=[common], help="create a domain")
    p.add_argument("config", nargs="?", help="an xl.cfg-style configuration file")
    p.add_argument("--name")
    p.add_argument("--memory", type=_int, help="guest RAM in MiB")
    p.add_argument("--vga", choices=VGA_CHOICES)
    p.add_argument("--videoram", type=_int, help="video memory in MiB")
    p.add_argument("--dm-mode", choices=DM_MODES)
    p.add_argument(
        "--dm-qemu-version",
        choices=DM_QEMU_VERSIONS,
        help="the QEMU the device model behaves as (xl.cfg device_model_qemu_version)",
    )
    p.add_argument("--dm-restrict", action="store_true", default=None)
    p.add_argument("--dm-stubdom", dest="dm_stubdom", action="store_true", default=None)
    _grant_arg(p)
    p.add_argument("--toolstack", choices=FLAVOURS)


def _add_queries(sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser) -> None:
    """``list``, ``info``, ``domid``, ``domname`` and ``vncviewer``: they change nothing."""
    p = sub.add_parser("list", parents=[common], help="list domains, as xl list")
    p.add_argument("-l", "--long", action="store_true", help="each domain's configuration as JSON")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", type=_domain)
    sub.add_parser("info", parents=[common], help="the host and the simulated Xen, as xl info")
    p = sub.add_parser("domid", parents=[common], help="the id of a named domain")
    p.add_argument("name")
    p = sub.add_parser("domname", parents=[common], help="the name of a domain id")
    p.add_argument("domid", type=_int)
    p = sub.add_parser("vncviewer", parents=[common], help="attach to a domain's VNC server")
    p.add_argument("domid", metavar="DOMAIN", type=_domain)


def _add_lifecycle(sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser) -> None:
    """``pause``, ``unpause`` and ``destroy`` of one domain."""
    for name, text in (
        ("pause", "pause a domain"),
        ("unpause", "unpause a domain"),
        ("destroy", "destroy a domain"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("domid", metavar="DOMAIN", type=_domain)


def _add_save_restore(
    sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser
) -> None:
    """``save`` and ``restore``: the domain to a file and back (libxl stream v2)."""
    p = sub.add_parser("save", parents=[common], help="save a domain to a file")
    p.add_argument(
        "-c", "--checkpoint", action="store_true", help="leave the domain running after saving"
    )
    p.add_argument(
        "-p", dest="leave_paused", action="store_true", help="leave the domain paused after saving"
    )
    p.add_argument(
        "--toolstack", choices=FLAVOURS, help="flavour to save with (default: the domain's)"
    )
    p.add_argument("domid", metavar="DOMAIN", type=_domain)
    p.add_argument("file")

    p = sub.add_parser("restore", parents=[common], help="restore a domain from a file")
    p.add_argument(
        "files",
        nargs="+",
        metavar="[CONFIG] FILE",
        help="the saved image, after an xl.cfg whose settings replace the image's",
    )
    p.add_argument(
        "-p", dest="paused", action="store_true", help="do not unpause the domain after restoring"
    )
    p.add_argument("--name")
    p.add_argument("--dm-mode", choices=DM_MODES)
    p.add_argument(
        "--dm-qemu-version",
        choices=DM_QEMU_VERSIONS,
        help="the QEMU the device model behaves as (xl.cfg device_model_qemu_version)",
    )
    p.add_argument("--dm-restrict", dest="dm_restrict", action="store_true", default=None)
    p.add_argument("--no-dm-restrict", dest="dm_restrict", action="store_false")
    p.add_argument("--dm-stubdom", dest="dm_stubdom", action="store_true", default=None)
    p.add_argument("--no-dm-stubdom", dest="dm_stubdom", action="store_false")
    _grant_arg(p)
    p.add_argument("--toolstack", choices=FLAVOURS)


def _add_migrate(sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser) -> None:
    """``migrate`` and ``migrate-receive``: the stream live over TCP."""
    p = sub.add_parser("migrate", parents=[common], help="migrate a domain live to a receiver")
    p.add_argument("domid", metavar="DOMAIN", type=_domain)
    p.add_argument("host", type=_address, help="ADDRESS:PORT of an `xl-sim migrate-receive`")
    p.add_argument("--max-rounds", type=_positive, default=migrate.MAX_ROUNDS)
    p.add_argument("--dirty-threshold", type=_count, default=migrate.DIRTY_THRESHOLD)

    p = sub.add_parser("migrate-receive", parents=[common], help="receive one migrating domain")
    p.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 0),
        help="ADDRESS:PORT to listen on (port 0: any; the first line printed names it)",
    )


def _add_guest(sub: argparse._SubParsersAction[OneLineParser], common: OneLineParser) -> None:
    """``guest DOMAIN ACTION``: the guest's own driver, run on its vCPU."""
    p = sub.add_parser("guest", parents=[common], help="drive the guest's vCPU")
    p.add_argument("domid", metavar="DOMAIN", type=_domain)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("map-bar", help="program and enable the VGA BAR")
    a.add_argument("--addr", type=_int, default=guest_drivers.DEFAULT_BAR_ADDR)
    a = actions.add_parser("set-mode", help="set a linear graphics mode")
    _mode_args(a)
    a.add_argument(
        "--vram-mib",
        type=_int,
        help="QXL: the size of BAR 0, where the RAM header sits at its end (default: the domain's)",
    )
    a = actions.add_parser("draw", help="fill the framebuffer with pattern_bytes(seed)")
    _mode_args(a, seed=True)
    a = actions.add_parser("fb-hash", help="sha256 of the framebuffer as the guest reads it")
    _mode_args(a)
    a = actions.add_parser("xs-read", help="read a xenstore node as the guest")
    a.add_argument("path")
    a = actions.add_parser("xs-write", help="write a xenstore node as the guest")
    a.add_argument("path")
    a.add_argument("value")


# --------------------------------------------------------------------------------------------


#: What a restore takes from the image whatever an xl.cfg given to it says: the saved memory and
#: device state only fit the guest they came from.
_FROM_IMAGE = ("memory_mib", "vga", "videoram_mib", "uuid")


def _read_xl_cfg(path: str) -> ParsedConfig:
    """Parse an xl.cfg file, warning once on stderr about each option not modelled (as xl
    warns about options its build lacks)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read {path}: {why}") from None
    parsed = parse_xl_cfg(text, path)
    for key, line in parsed.ignored:
        print(
            f"{PROG}: warning: {path}:{line}: ignoring {key}: not modelled by the simulated host",
            file=sys.stderr,
        )
    return parsed


def _create_config(args: argparse.Namespace) -> DomainConfig:
    base = _read_xl_cfg(args.config).config if args.config else DomainConfig()
    return base.with_overrides(
        name=args.name,
        memory_mib=args.memory,
        vga=args.vga,
        videoram_mib=args.videoram,
        dm_mode=args.dm_mode,
        dm_qemu_version=args.dm_qemu_version,
        dm_restrict=args.dm_restrict,
        dm_stubdom=args.dm_stubdom,
        dm_stubdom_grants=None if args.dm_grants is None else tuple(args.dm_grants),
        toolstack=args.toolstack,
    )


def _restore_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``restore [CONFIG] FILE``: the CONFIG's settings, then the options, over the image's."""
    if len(args.files) > 2:
        raise ConfigError("restore takes [CONFIG] FILE: too many files")
    overrides: dict[str, Any] = {}
    if len(args.files) == 2:
        parsed = _read_xl_cfg(args.files[0])
        for field in sorted(parsed.fields):
            if field in _FROM_IMAGE:
                print(
                    f"{PROG}: warning: {args.files[0]}: {field} is taken from the saved image",
                    file=sys.stderr,
                )
            else:
                overrides[field] = getattr(parsed.config, field)
    options = {
        "name": args.name,
        "dm_mode": args.dm_mode,
        "dm_qemu_version": args.dm_qemu_version,
        "dm_restrict": args.dm_restrict,
        "dm_stubdom": args.dm_stubdom,
        "dm_stubdom_grants": None if args.dm_grants is None else tuple(args.dm_grants),
        "toolstack": args.toolstack,
    }
    overrides.update({k: v for k, v in options.items() if v is not None})
    return overrides


def _mode_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"width": args.width, "height": args.height, "bpp": args.bpp, "addr": args.addr}


async def _guest(lx: Libxl, args: argparse.Namespace) -> dict[str, Any]:
    domid: int = args.domid
    out: dict[str, Any] = {"domid": domid, "action": args.action}
    if args.action == "map-bar":
        await lx.guest_driver(domid, "map_bar", {"addr": args.addr})
        out["addr"] = args.addr
    elif args.action == "set-mode":
        vram = args.vram_mib if args.vram_mib is not None else lx.domain_config(domid).vram_mib
        params = _mode_params(args) | {"vram_mib": vram}
        await lx.guest_driver(domid, "set_mode", params)
        out.update(params)
    elif args.action == "draw":
        await lx.guest_driver(domid, "draw", _mode_params(args) | {"seed": args.seed})
        out["seed"] = args.seed
    elif args.action == "fb-hash":
        result = await lx.guest_driver(domid, "sha256", _mode_params(args))
        out["sha256"] = result[-1] if isinstance(result, list) and result else result
    elif args.action == "xs-read":
        (value,) = await lx.guest_ops(domid, [{"op": "xs_read", "path": args.path}])
        out.update(path=args.path, value=value.decode() if isinstance(value, bytes) else value)
    elif args.action == "xs-write":
        await lx.guest_ops(domid, [{"op": "xs_write", "path": args.path, "value": args.value}])
        out.update(path=args.path, value=args.value)
    return out


async def _resolve(lx: Libxl, args: argparse.Namespace) -> None:
    """Names given for ``<Domain>`` become domids, as xl's find_domain() does."""
    if isinstance(getattr(args, "domid", None), str):
        args.domid = await find_domain(lx, args.domid)
    if getattr(args, "domains", None):
        args.domains = [await find_domain(lx, str(d), guest=False) for d in args.domains]


async def _list(lx: Libxl, args: argparse.Namespace) -> dict[str, Any]:
    wanted: list[int] = args.domains or []
    if len(wanted) > 1:
        raise ToolstackError("list takes one DOMAIN at most, as xl list does")
    only = wanted[0] if wanted else None
    if args.long:
        return {"long": await xl_info.long_form(lx, only)}
    rows = await xl_info.list_rows(lx, only) if only != 0 else []
    host = xl_info.domain0_row() if only in (None, 0) else None
    return {"domain0": host, "domains": rows}


async def _save(lx: Libxl, args: argparse.Namespace) -> dict[str, Any]:
    """``xl save [-c] [-p]``: ``-p`` keeps the domain, paused."""
    keep = args.checkpoint or args.leave_paused
    result = await lx.save(args.domid, args.file, checkpoint=keep, toolstack=args.toolstack)
    out = result.as_dict()
    if args.leave_paused:
        await lx.pause(args.domid)
        out["paused"] = True
    return out


async def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run one parsed command; returns what ``--json`` prints."""
    config = _create_config(args) if args.command == "create" else None
    overrides = _restore_overrides(args) if args.command == "restore" else None
    async with open_libxl(args.rundir, command=args.command) as lx:
        await _resolve(lx, args)
        if args.command == "create":
            assert config is not None
            return (await lx.create(config)).as_dict()
        if args.command == "list":
            return await _list(lx, args)
        if args.command == "info":
            return await xl_info.host_info(lx)
        if args.command == "domid":
            return {"name": args.name, "domid": await find_domain(lx, args.name, guest=False)}
        if args.command == "domname":
            return {"domid": args.domid, "name": await domain_name(lx, args.domid)}
        if args.command == "vncviewer":
            return await vncviewer.address(lx, args.domid)
        if args.command == "pause":
            await lx.pause(args.domid)
            return {"domid": args.domid, "paused": True}
        if args.command == "unpause":
            await lx.unpause(args.domid)
            return {"domid": args.domid, "paused": False}
        if args.command == "destroy":
            await lx.destroy(args.domid)
            return {"domid": args.domid, "destroyed": True}
        if args.command == "save":
            return await _save(lx, args)
        if args.command == "restore":
            image = args.files[-1]
            return (await lx.restore(image, overrides=overrides, paused=args.paused)).as_dict()
        if args.command == "guest":
            return await _guest(lx, args)
        if args.command == "migrate":
            return await _migrate(lx, args)
        if args.command == "migrate-receive":
            return await _migrate_receive(lx, args)
    raise AssertionError(f"unhandled command {args.command}")


async def _migrate(lx: Libxl, args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.host
    try:
        s = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        why = exc.strerror or exc
        raise ToolstackError(f"cannot reach a receiver at {host}:{port}: {why}") from None
    async with s:
        result = await migrate.migrate(
            lx,
            args.domid,
            s,
            f"{host}:{port}",
            max_rounds=args.max_rounds,
            dirty_threshold=args.dirty_threshold,
        )
    return result.as_dict()


async def _migrate_receive(lx: Libxl, args: argparse.Namespace) -> dict[str, Any]:
    """``xl migrate-receive``: one incoming domain, on one TCP connection."""
    host, port = args.listen
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ToolstackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    listener = listeners[0]
    try:
        bound = listener.socket.getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", flush=True)
        s = await listener.accept()
    finally:
        for lst in listeners:
            await lst.aclose()
    async with s:
        return await migrate.migrate_receive(lx, s)


def _human(command: str, out: dict[str, Any]) -> str:
    if command == "create":
        return f"Domain {out['domid']} ({out['name']}) created; device model pid {out['dm_pid']}"
    if command == "list":
        if "long" in out:
            return json.dumps(out["long"], indent=4)
        rows = ([out["domain0"]] if out["domain0"] else []) + out["domains"]
        return xl_info.render_list(rows)
    if command == "info":
        return xl_info.render_info(out)
    if command == "domid":
        return str(out["domid"])
    if command == "domname":
        return str(out["name"])
    if command == "vncviewer":
        return vncviewer.describe(out)
    if command == "save":
        return (
            f"Saved domain {out['domid']} to {out['file']}: {out['bytes']} bytes, "
            f"records {' '.join(out['records'])} ({out['seconds']:.2f} s)"
        )
    if command == "restore":
        return (
            f"Restored domain {out['domid']} ({out['name']}): records {' '.join(out['records'])}"
            f" ({out['seconds']:.2f} s)"
        )
    if command == "migrate":
        return (
            f"Migrated domain {out['domid']} to {out['destination']}: {out['precopy_rounds']}"
            f" pre-copy rounds, {out['pages_sent']} pages, downtime {out['downtime_s']:.3f} s,"
            f" total {out['total_s']:.2f} s"
        )
    if command == "migrate-receive":
        return f"Received domain {out['domid']} ({out['name']}), running"
    if command == "guest":
        if "sha256" in out:
            return str(out["sha256"])
        if out["action"] == "xs-read":
            return str(out["value"])
        return ""
    return ""


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    if getattr(args, "json", False):
        print(json.dumps({"command": getattr(args, "command", None), "error": message}))
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    if not hasattr(args, "rundir"):
        args.rundir = os.environ.get("PHYSMAP_LAB_RUNDIR")
    if not args.rundir:
        parser.error("no run directory: give --rundir or set PHYSMAP_LAB_RUNDIR")
    try:
        out = trio.run(run_command, args)
    except (ToolstackError, ConfigError, StreamError) as exc:
        _fail(args, str(exc))
    except XsError as exc:
        _fail(args, f"xenstore: {exc}")
    except HypercallError as exc:
        _fail(args, f"hypervisor: {exc}")
    except (XsDisconnected, HypervisorDisconnected) as exc:
        _fail(args, f"lost a daemon connection: {exc}")
    except OSError as exc:
        _fail(args, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    except KeyboardInterrupt:
        _fail(args, "interrupted")
    if args.json:
        print(json.dumps(out))
    else:
        text = _human(args.command, out)
        if text:
            print(text, flush=True)
        if args.command == "vncviewer":
            _viewer(args, out)


def _viewer(args: argparse.Namespace, out: dict[str, Any]) -> None:
    try:
        vncviewer.exec_viewer(out)
    except ToolstackError as exc:
        _fail(args, str(exc))
    print(f"{PROG}: no VNC viewer to start (install vncviewer or set $VNCVIEWER)", file=sys.stderr)


if __name__ == "__main__":
    main()

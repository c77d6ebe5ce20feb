"""``xenstored-sim``: the command line of the daemon.

Flags follow C xenstored where it has them: ``-E`` nodes, ``-S`` node size, ``-W`` watches,
``-t`` transactions, ``-A`` permissions per node, ``-M`` path length, ``-Q name=value`` any
quota, ``-q memory=N`` the soft memory quota, ``-w watch-event=SECONDS`` the watch-event
timeout (docs/xenstore.md, 'Quotas', 'Watch events and the send queue'; C 4.17's usage text).  Like
C (``xs_lib.c``), the run directory comes from ``XENSTORED_RUNDIR`` and the socket path from
``XENSTORED_PATH`` unless given as flags.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from .client.paths import DEFAULT_RUNDIR, add_principal_socket_argument, parse_principal_sockets
from .core import Quotas
from .core.errors import XsErrno
from .ready import add_ready_fd_argument, notify_ready, ready_fd_from
from .server.daemon import DaemonConfig, serve_xenstored
from .server.durable import DEFAULT_JOURNAL_MAX, SyncPolicy
from .startup import OneLineParser, answering_pid, os_errors

_IGNORED_C_FLAGS = (
    "C xenstored 4.17's other flags are accepted so that a harness starting C can start this "
    "instead: -N/--no-fork (this daemon never forks), -D/--no-domain-init (there is no dom0 "
    "ring to set up), -R/--no-recovery, -I/--internal-db [on|off] (the store is in memory, or "
    "in --state-dir), -U/--live-update, --event, --master-domid and --priv-domid have no "
    "meaning here and are ignored."
)


def _quota_arg(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, int(value)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="xenstored-sim",
        description="A xenstore daemon speaking the real wire protocol.",
        epilog=_IGNORED_C_FLAGS,
        add_help=False,
    )
    p.add_argument("-h", "-H", "--help", action="help", help="show this help message and exit")
    _c_flags(p)
    p.add_argument(
        "--rundir", help=f"run directory (default: $XENSTORED_RUNDIR, else {DEFAULT_RUNDIR})"
    )
    p.add_argument("--socket", help="privileged socket (default: $XENSTORED_PATH or RUNDIR/socket)")
    _durable_options(p)
    add_ready_fd_argument(p)
    add_principal_socket_argument(p, "privileged socket")
    # Set by a live update on the re-executed daemon (server/live_update.py).
    p.add_argument("--live-update-state", type=int, help=argparse.SUPPRESS)
    _quota_options(p)
    return p


def _durable_options(p: argparse.ArgumentParser) -> None:
    """The durable store and the audit log."""
    p.add_argument("--state-dir", help="directory of the durable store")
    p.add_argument(
        "--sync",
        choices=[policy.value for policy in SyncPolicy],
        default=SyncPolicy.BATCH.value,
        help="when the journal is fsynced with --state-dir: before every reply (always), once "
        "per batch of requests before their replies (batch, the default), never (none: "
        "survives a daemon crash, not a machine crash)",
    )
    p.add_argument(
        "--journal-max",
        type=int,
        default=DEFAULT_JOURNAL_MAX,
        metavar="BYTES",
        help="compact the journal into a snapshot past this size (default: %(default)s)",
    )
    p.add_argument("--audit-log", help="write one JSON record per request to this file")


def _quota_options(p: argparse.ArgumentParser) -> None:
    """C xenstored's quota flags (cf. tools/xenstored/core.c: options[], usage())."""
    p.add_argument("-E", "--entry-nb", type=int, dest="nodes", help="nodes per domain")
    p.add_argument("-S", "--entry-size", type=int, dest="node_size", help="max. node size")
    p.add_argument("-W", "--watch-nb", type=int, dest="watches", help="watches per domain")
    p.add_argument(
        "-t", "--transaction", type=int, dest="transactions", help="transactions per domain"
    )
    p.add_argument("-A", "--perm-nb", type=int, dest="permissions", help="permissions per node")
    p.add_argument("-M", "--path-max", type=int, dest="path_max", help="max. path length")
    p.add_argument(
        "-Q",
        "--quota",
        type=_quota_arg,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a quota by its C name (nodes, watches, outstanding, memory, transactions, "
        "transaction-nodes, permissions, path-max, node-size)",
    )
    p.add_argument(
        "-q",
        "--quota-soft",
        type=_quota_arg,
        action="append",
        default=[],
        metavar="memory=VALUE",
        help="set the soft memory quota (a warning only)",
    )
    p.add_argument(
        "-w",
        "--timeout",
        type=_quota_arg,
        action="append",
        default=[],
        metavar="watch-event=SECONDS",
        help="time a watch event is kept pending for a guest (default 20; 0: forever)",
    )


def _c_flags(p: argparse.ArgumentParser) -> None:
    """The flags of C xenstored 4.17 (cf. tools/xenstore/xenstored_core.c: options[], usage())
    beyond the quota ones."""
    p.add_argument("-F", "--pid-file", metavar="FILE", help="write the daemon's pid to FILE")
    p.add_argument(
        "-P", "--output-pid", action="store_true", help="print the daemon's pid on stdout"
    )
    p.add_argument(
        "-T",
        "--trace-file",
        metavar="FILE",
        help="log every request and reply to FILE, in C xenstored's trace format",
    )
    p.add_argument("-V", "--verbose", action="store_true", help="log more (debug level)")
    p.add_argument(
        "-K",
        "--keep-orphans",
        action="store_true",
        help="on RELEASE, give a domain's nodes to dom0 instead of deleting them",
    )
    for short, long in (("-N", "--no-fork"), ("-D", "--no-domain-init"), ("-R", "--no-recovery")):
        p.add_argument(short, long, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-U", "--live-update", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-I", "--internal-db", nargs="?", const="on", help=argparse.SUPPRESS)
    for long in ("--event", "--master-domid", "--priv-domid"):
        p.add_argument(long, type=int, help=argparse.SUPPRESS)


def config_from_args(argv: Sequence[str] | None = None) -> DaemonConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    rundir = args.rundir or os.environ.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR
    socket_path = args.socket or os.environ.get("XENSTORED_PATH") or os.path.join(rundir, "socket")
    quotas = Quotas()
    try:
        for name in ("nodes", "node_size", "watches", "transactions", "permissions", "path_max"):
            value = getattr(args, name)
            if value is not None:
                quotas.set(name.replace("_", "-"), value)
        for name, value in args.quota:
            quotas.set(name, value)
        for name, value in args.quota_soft:
            if name != "memory" or value < 1:
                raise XsErrno("EINVAL")
            quotas.soft_memory = value
    except XsErrno:
        parser.error("invalid quota name or value")
    if args.journal_max < 1:
        parser.error(f"--journal-max {args.journal_max}: must be at least 1")
    if args.live_update_state is not None:
        try:
            os.fstat(args.live_update_state)
        except OSError as exc:
            parser.error(f"--live-update-state {args.live_update_state}: {exc.strerror or exc}")
    watch_event_timeout = 20.0
    for name, value in args.timeout:
        if name != "watch-event":
            parser.error(f"unknown timeout {name!r}")
        watch_event_timeout = float(value)
    try:
        principal_sockets = parse_principal_sockets(args.principal_socket)
    except ValueError as exc:
        parser.error(str(exc))
    if any(path == socket_path for _, path in principal_sockets):
        parser.error(f"--principal-socket: {socket_path} is the privileged socket itself")
    return DaemonConfig(
        rundir=rundir,
        socket_path=socket_path,
        quotas=quotas,
        audit_log=args.audit_log,
        state_dir=args.state_dir,
        sync=SyncPolicy(args.sync),
        journal_max=args.journal_max,
        live_update_state=args.live_update_state,
        watch_event_timeout=watch_event_timeout,
        trace_file=args.trace_file,
        keep_orphans=args.keep_orphans,
        pid_file=args.pid_file,
        output_pid=args.output_pid,
        verbose=args.verbose,
        principal_sockets=principal_sockets,
    )


async def _main(config: DaemonConfig, ready_fd: int | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_xenstored, config)
            _announce(config)
            notify_ready("xenstored-sim", config.socket_path, ready_fd)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _prepare(config: DaemonConfig) -> None:
    """Create the directories the daemon writes into (the run directory with ``domains/``,
    the state directory, the audit log's directory); refuse a socket a live daemon serves."""
    dirs = [os.path.join(config.rundir, "domains")]
    if config.state_dir:
        dirs.append(config.state_dir)
    if config.audit_log:
        dirs.append(os.path.dirname(os.path.abspath(config.audit_log)))
    for d in dirs:
        if os.path.lexists(d) and not os.path.isdir(d):
            raise NotADirectoryError(errno.ENOTDIR, f"{d} is not a directory")
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot create directory {d}: {exc.strerror or exc}"
            ) from None
    if config.live_update_state is None:
        # Before the state directory is opened: a second daemon must not touch the journal
        # of a live first one.
        answering_pid(config.socket_path)


def _announce(config: DaemonConfig) -> None:
    """Once serving: C's write_pidfile() (``%ld\\n``) and ``-P``'s pid on stdout."""
    if config.pid_file:
        with open(config.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    if config.output_pid:
        print(os.getpid(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    ready_fd = ready_fd_from(argv)
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        stream=sys.stderr,
        format="xenstored-sim: %(message)s",
    )
    try:
        _prepare(config)
        trio.run(_main, config, ready_fd)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # Start-up failures (a socket in use or that cannot be bound, an unreadable state
        # directory) may reach here wrapped by the nurseries.
        lines = os_errors(exc)
        if lines is None:
            raise
        for line in lines:
            print(f"xenstored-sim: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

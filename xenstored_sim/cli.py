"""``xenstored-sim``: the command line of the daemon.

Flags follow C xenstored where it has them: ``-E`` nodes, ``-S`` node size, ``-W`` watches,
``-t`` transactions, ``-A`` permissions per node, ``-M`` path length, ``-Q name=value`` any
quota, ``-q memory=N`` the soft memory quota, ``-w watch-event=SECONDS`` the watch-event
timeout (xenstore-facts.md §7.1, §4.8; C 4.17's usage text).  Like C (``xs_lib.c``), the run directory comes from
``XENSTORED_RUNDIR`` and the socket path from ``XENSTORED_PATH`` unless given as flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

import trio

from .client.paths import DEFAULT_RUNDIR, parse_principal_sockets
from .core import Quotas
from .core.errors import XsErrno
from .ready import add_ready_fd_argument, notify_ready, ready_fd_from
from .server import DaemonConfig, serve_xenstored
from .server.durable import DEFAULT_JOURNAL_MAX, SyncPolicy


def _quota_arg(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xenstored-sim", description="A xenstore daemon speaking the real wire protocol."
    )
    p.add_argument(
        "--rundir", help=f"run directory (default: $XENSTORED_RUNDIR, else {DEFAULT_RUNDIR})"
    )
    p.add_argument("--socket", help="privileged socket (default: $XENSTORED_PATH or RUNDIR/socket)")
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
    add_ready_fd_argument(p)
    p.add_argument(
        "--principal-socket",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a further privileged socket for one principal (toolstack, device-model, ...); "
        "the audit log names NAME for its connections (repeatable)",
    )
    # Set by a live update on the re-executed daemon (server/live_update.py).
    p.add_argument("--live-update-state", type=int, help=argparse.SUPPRESS)
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
    return p


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
    if args.state_dir:
        os.makedirs(args.state_dir, exist_ok=True)
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
        principal_sockets=principal_sockets,
    )


async def _main(config: DaemonConfig, ready_fd: int | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_xenstored, config)
            notify_ready("xenstored-sim", config.socket_path, ready_fd)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    ready_fd = ready_fd_from(argv)
    os.makedirs(config.rundir, exist_ok=True)
    try:
        trio.run(_main, config, ready_fd)
    except OSError as exc:
        print(f"xenstored-sim: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Start-up failures (a socket that cannot be bound, an unreadable state directory)
        # reach here wrapped by the nurseries.
        errors, rest = group.split(OSError)
        if errors is None or rest is not None:
            raise
        for leaf in _leaves(errors):
            print(f"xenstored-sim: {leaf}", file=sys.stderr)
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())

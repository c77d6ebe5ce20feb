"""hypervisor-sim: the simulated Xen hypervisor (domains, guest memory, p2m, ioreqs).

Ready when RUNDIR/hypervisor.sock accepts: it then prints one "ready" line (and writes it to
--ready-fd).  SIGTERM or SIGINT stops it cleanly: the socket and every RUNDIR/mem/dom*.mem
file are removed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys

import trio

from xenhost import RunDir
from xenstored_sim.client.paths import add_principal_socket_argument, parse_principal_sockets
from xenstored_sim.ready import add_ready_fd_argument, notify_ready
from xenstored_sim.startup import OneLineParser, os_errors

from .server import AuditLog, HypervisorServer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="hypervisor-sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rundir", required=True, help="the run directory (hypervisor.sock, mem/)")
    p.add_argument(
        "--xen-libs",
        default="4.17",
        help="Xen library version to report; xenforeignmemory_map2 exists from 4.10 on",
    )
    p.add_argument("--audit-log", metavar="FILE", help="append one JSON line per hypercall")
    add_ready_fd_argument(p)
    add_principal_socket_argument(p, "hypercall socket")
    args = p.parse_args(argv)
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", args.xen_libs):
        p.error(f"--xen-libs {args.xen_libs!r}: expected a version such as 4.17")
    try:
        args.principal_sockets = parse_principal_sockets(args.principal_socket)
    except ValueError as exc:
        p.error(str(exc))
    main_socket = str(RunDir(args.rundir).hypervisor_socket)
    if any(
        os.path.abspath(path) == os.path.abspath(main_socket) for _, path in args.principal_sockets
    ):
        p.error(f"--principal-socket: {main_socket} is the hypercall socket itself")
    return args


async def _run(server: HypervisorServer, ready_fd: int | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            notify_ready("hypervisor-sim", server.sock_path, ready_fd)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    audit: AuditLog | None = None
    try:
        if args.audit_log:
            try:
                audit = AuditLog(args.audit_log)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot open the audit log {args.audit_log}: {exc.strerror or exc}"
                ) from None
        trio.run(
            _run,
            HypervisorServer(args.rundir, args.xen_libs, audit, args.principal_sockets),
            args.ready_fd,
        )
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        lines = os_errors(exc)
        if lines is None:
            raise
        for line in lines:
            print(f"hypervisor-sim: {line}", file=sys.stderr)
        return 1
    finally:
        if audit is not None:
            audit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

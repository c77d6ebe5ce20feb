"""The guard of ``xl-sim migrate-receive``: destroys a half-received domain if the receiver dies.

The receiver builds the destination domain as soon as the stream's configuration is in
(toolstack/migrate.py), so a receiver killed mid-stream would leave it behind; its own rollback
covers every failure but its death.  The receiver starts this guard in a session of its own with
a pipe on its stdin and writes ``domid N`` once the domain exists and ``done`` once nothing is
left to undo (the domain is the destination's, or the receiver removed it).  When the pipe
closes without ``done``, the guard destroys domain N, as the receiver would have.  Usage:
``python -m toolstack.migrate_guard RUNDIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from .libxl import ToolstackError, open_libxl

#: How long the guard's clean-up may take.
CLEANUP_LIMIT_S = 60.0


def undo(lines: Sequence[str]) -> int | None:
    """The domain to destroy, from what the receiver wrote: the last ``domid N`` unless
    ``done`` followed it."""
    domid: int | None = None
    for line in lines:
        word, _, arg = line.strip().partition(" ")
        if word == "domid" and arg.isdigit():
            domid = int(arg)
        elif word == "done":
            domid = None
    return domid


async def _guard(rundir: str) -> int:
    data = await trio.to_thread.run_sync(sys.stdin.buffer.read)
    domid = undo(data.decode(errors="replace").splitlines())
    if domid is None:
        return 0
    try:
        with trio.fail_after(CLEANUP_LIMIT_S):
            async with open_libxl(rundir, command="migrate-receive-guard") as lx:
                await lx.destroy(domid)
    except (ToolstackError, trio.TooSlowError) as exc:
        print(f"migrate-receive guard: cannot destroy domain {domid}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m toolstack.migrate_guard RUNDIR", file=sys.stderr)
        return 2
    return trio.run(_guard, args[0])


if __name__ == "__main__":
    sys.exit(main())

"""The daemon's main loop: one poll over every client socket, then each ready one in turn.

C xenstored's ``main()`` (tools/xenstored/core.c) polls all connections at once and then calls
``handle_input()`` and ``handle_output()`` for each one that is ready, so that eight busy
clients cost one poll, not eight wake-ups.  This is the same loop inside trio: one task owns
the epoll set of the client sockets (:class:`~.conn_io.Reactor`, level-triggered, so that a
socket stays ready until it has been read) and waits for the set itself to become readable
with ``trio.lowlevel.wait_readable``.  Each ready connection is served synchronously and reads
at most one frame's worth, so no connection can hold up the others; the listeners, the group
commit and the guest expirers stay ordinary trio tasks.

Waking a trio task costs several microseconds of interpreter time, about what C spends on a
whole request, so the loop tries not to wait: after serving a round it polls again without
blocking, up to :data:`_SPINS` rounds in a row, after which it lets the other tasks run.
"""

from __future__ import annotations

from typing import Final

import trio

from .conn_io import Reactor

# Rounds served without waiting before the loop lets the other tasks run.
_SPINS: Final = 8
# Events taken per poll: C's poll array has one slot per connection; this only bounds a round.
_MAX_EVENTS: Final = 256


async def run_main_loop(reactor: Reactor) -> None:
    """Serve ready connections until cancelled.  The reactor's owner closes it once every
    connection's task has ended."""
    while True:
        if reactor.serve_rounds(_SPINS, _MAX_EVENTS):
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.wait_readable(reactor.epoll.fileno())

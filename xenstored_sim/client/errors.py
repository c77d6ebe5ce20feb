"""Exceptions of the client, besides the daemon's own :class:`~xenstored_sim.wire.XsError`."""

from __future__ import annotations

import trio

__all__ = ["WatchOverflow", "XsDisconnected"]


class XsDisconnected(ConnectionError, trio.BrokenResourceError):
    """The connection to the daemon is gone (closed, reset, or broken by a protocol error).

    Every request waiting for a reply and every watch iterator raises it; its ``__cause__`` says
    why.  A ``ConnectionError``, as every lost daemon connection in physmap-lab is
    (``hypervisor_sim.protocol.HypervisorDisconnected`` too); it remains a
    ``trio.BrokenResourceError`` for callers of this client that catch that.
    """


class WatchOverflow(Exception):
    """A watch's buffer filled up and a later event could not be kept.

    The events buffered before the overflow are still delivered; the iterator raises this
    instead of the first lost event and then stops.  The watch stays registered with the daemon
    until its ``async with`` block exits.  The caller's view of the watched subtree is stale:
    re-read it.
    """

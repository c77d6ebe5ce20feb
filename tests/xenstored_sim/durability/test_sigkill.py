"""SIGKILL at random moments: every acknowledged change survives the restart.

Several clients, each on its own connection, write unique keys, remove some of them and
commit small transactions, noting each change once its reply has arrived.  The daemon is
killed at a random moment (small ``--journal-max``, so kills also land around compaction),
restarted on the same state directory, and every acknowledged change must be there.  The
round count is ``--kill-rounds`` or ``$XS_KILL_ROUNDS`` (20 by default).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import trio

from xenstored_sim.client import XsClient, XsDisconnected, open_xenstore
from xenstored_sim.wire import XsError

if TYPE_CHECKING:
    from .conftest import StatefulDaemon

WRITERS = 4
POLICIES = ("batch", "always", "none")


async def _writer(
    daemon: StatefulDaemon, rnd: int, who: int, expect: dict[str, bytes | None]
) -> None:
    """Change keys until the daemon dies; ``expect`` gets each acknowledged change (None for
    a removal).  A change in flight at the kill may or may not have happened: its keys are
    dropped from ``expect``."""
    base = f"/kill/r{rnd}/w{who}"
    try:
        async with open_xenstore(daemon.socket) as xs:
            i = 0
            while True:
                i += 1
                await _step(xs, base, i, expect)
    except (XsDisconnected, OSError, XsError):
        return


async def _step(xs: XsClient, base: str, i: int, expect: dict[str, bytes | None]) -> None:
    key = f"{base}/k{i}"
    value = f"{base}:{i}".encode()
    if i % 7 == 0:
        keys = [f"{key}a", f"{key}b"]
        for k in keys:
            expect.pop(k, None)
        async with xs.transaction() as t:
            for k in keys:
                await t.write(k, value)
        for k in keys:
            expect[k] = value
    elif i % 5 == 0:
        victim = f"{base}/k{i - 1}"
        expect.pop(victim, None)
        await xs.rm(victim)
        expect[victim] = None
    else:
        await xs.write(key, value)
        expect[key] = value


async def _check(xs: XsClient, expect: dict[str, bytes | None]) -> int:
    lost = 0
    for key, value in expect.items():
        try:
            got: bytes | None = await xs.read(key)
        except XsError as exc:
            assert exc.errno_name == "ENOENT"
            got = None
        lost += got != value
    return lost


async def test_acknowledged_changes_survive_sigkill(
    daemon: StatefulDaemon, kill_rounds: int
) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    everything: dict[str, bytes | None] = {}
    last: dict[str, bytes | None] = {}
    lost = 0
    for rnd in range(kill_rounds + 1):
        policy = POLICIES[rnd % len(POLICIES)]
        await daemon.start("--sync", policy, "--journal-max", "8192")
        async with open_xenstore(daemon.socket) as xs:
            # What the previous round acknowledged, then (at the end) every round's.
            lost += await _check(xs, everything if rnd == kill_rounds else last)
        if rnd == kill_rounds:
            break
        last = {}
        async with trio.open_nursery() as nursery:
            for who in range(WRITERS):
                nursery.start_soon(_writer, daemon, rnd, who, last)
            await trio.sleep(rng.uniform(0.02, 0.25))
            daemon.kill()
        everything.update(last)
    daemon.stop()
    print(
        f"kill rounds: {kill_rounds}, acknowledged changes: {len(everything)}, lost: {lost}, "
        f"seed {seed}"
    )
    assert len(everything) > kill_rounds  # the clients did get work done between kills
    assert lost == 0, f"seed {seed}"

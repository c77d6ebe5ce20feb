"""``python -m physmap_lab.soak --seed N --steps K``: a seeded random walk over the whole stack.

The real processes (xenstored-sim with a state directory, hypervisor-sim, a qemu-model per
domain started by ``xl-sim``) are driven only through their public interfaces: ``xl-sim``
commands, guest actions, QMP on each device model's socket, second daemons started on the same
run directory, and SIGKILL of any one process.  A model of what should exist is checked after
every step: the daemons answer, ``xl-sim list`` shows exactly the model's domains, a
framebuffer drawn before a save reads back the same after the restore (except for the
combination known to corrupt it: pointer-fixup with QXL), and at the end no process, socket
or guest-memory file is left.  The first failed check stops the walk with the seed, the step
and the history needed to replay it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

from .soak_steps import STEPS
from .soak_walk import Walk, WalkFailure, walk_stack


def run_walk(seed: int, steps: int, *, log: Callable[[str], None] | None = None) -> Walk:
    """Run ``steps`` random steps from ``seed``, checking the model after each; then check that
    nothing is left.  Raises :class:`WalkFailure` naming the seed, step and history."""
    names = list(STEPS)
    weights = [STEPS[n][0] for n in names]
    with walk_stack(seed) as walk:
        step = 0
        try:
            walk.check()
            for step in range(1, steps + 1):
                name = walk.rng.choices(names, weights)[0]
                walk.history.append(name)
                STEPS[name][1](walk)
                walk.check()
                if log is not None:
                    log(f"step {step}: {name} ({len(walk.domains)} domains)")
            walk.final_check()
        except WalkFailure as exc:
            tail = ", ".join(walk.history[-12:])
            raise WalkFailure(
                f"seed {seed}, step {step}: {exc}\n  last steps: {tail}\n"
                f"  replay: python -m physmap_lab.soak --seed {seed} --steps {step}"
            ) from None
        return walk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="physmap_lab.soak", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new one)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    if args.steps < 0:
        p.error("--steps must not be negative")
    print(f"soak: seed {seed}, {args.steps} steps", flush=True)
    t0 = time.monotonic()
    try:
        run_walk(seed, args.steps, log=print if args.verbose else None)
    except WalkFailure as exc:
        print(f"soak: FAILED {exc}", file=sys.stderr)
        return 1
    print(f"soak: seed {seed}: {args.steps} steps passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

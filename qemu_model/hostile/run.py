"""``qemu-model --hostile SCRIPT``: the attacker process.

It takes the device model's place with the device model's arguments and acquires what the
device model holds after init (cf. QEMU hw/i386/xen/xen-hvm.c: xen_hvm_init_pc(), and
xen_restrict() in softmmu/vl.c's setup_post): a privcmd connection to the hypervisor and a
xenstore connection on ``--xenstore`` (dom0's privileged socket, or a stub domain's guest
socket).  ``--restrict`` restricts the privcmd handle to ``--domid``; QEMU 2.10 left its
xenstore handle open, QEMU >= 3.0 closes it (``--qemu-version``).  ``--stubdom`` says the device
model runs in a stub domain, whose hypercalls Xen allows on its target alone (the XSM dummy
policy's XSM_DM_PRIV, xen/include/xsm/dummy.h: ``src->target == target``), so the privcmd
handle is restricted to ``--domid`` there too.

Each attack's outcome is one JSON line on stdout.  Before a watch attack listens, a line
``{"trigger": PATH}`` asks the caller to make the watched event happen and to answer with a
line on stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.client import open_xenstore

from .attacks import Handles, check_script, run_one

PROG = "qemu-model --hostile"
#: QEMU releases whose xen_restrict closes the xenstore handle too.
XENSTORE_CLOSED_FROM: tuple[int, int] = (3, 0)


def qemu_version(text: str) -> tuple[int, int]:
    """``X.Y`` (``2.10``, ``3.0``...) or ``current``, the newest behaviour."""
    if text == "current":
        return (99, 0)
    parts = text.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise argparse.ArgumentTypeError(f"bad QEMU version {text!r} (want e.g. 2.10)")
    return int(parts[0]), int(parts[1])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="A compromised device model.")
    p.add_argument("--hostile", metavar="SCRIPT", required=True, help="JSON list of attacks")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--rundir", default=os.environ.get("PHYSMAP_LAB_RUNDIR"))
    p.add_argument("--xenstore", metavar="PATH")
    p.add_argument("--hypervisor", metavar="PATH", help="default RUNDIR/hypervisor.sock")
    p.add_argument("--restrict", action="store_true")
    p.add_argument("--stubdom", action="store_true", help="the device model is a stub domain")
    p.add_argument("--qemu-version", type=qemu_version, default=(2, 10))
    a, _ignored = p.parse_known_args(argv)  # the device model's other options do not matter
    if not a.rundir:
        p.error("--rundir is required (or set PHYSMAP_LAB_RUNDIR)")
    if a.domid < 1:
        p.error("--domid must be a guest domain (>= 1)")
    return a


def xenstore_closed(a: argparse.Namespace) -> bool:
    return bool(a.restrict) and tuple(a.qemu_version) >= XENSTORE_CLOSED_FROM


async def _wait_trigger(path: str) -> None:
    print(json.dumps({"trigger": path}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)


async def attack(a: argparse.Namespace, steps: list[dict[str, Any]]) -> None:
    rundir = Path(a.rundir)
    hv_path = Path(a.hypervisor) if a.hypervisor else rundir / "hypervisor.sock"
    privcmd = await trio.to_thread.run_sync(Privcmd, hv_path)
    try:
        if a.restrict or a.stubdom:
            await trio.to_thread.run_sync(privcmd.restrict, a.domid)
        async with AsyncExitStack() as stack:
            xs = None
            if not xenstore_closed(a):
                path = a.xenstore or os.environ.get("XENSTORED_PATH") or str(rundir / "socket")
                xs = await stack.enter_async_context(open_xenstore(path))
            handles = Handles(xs=xs, privcmd=privcmd, wait_trigger=_wait_trigger)
            for step in steps:
                outcome = await run_one(handles, step)
                print(json.dumps(outcome.as_json()), flush=True)
    finally:
        privcmd.close()


def main(argv: Sequence[str]) -> int:
    a = parse_args(argv)
    try:
        steps = check_script(json.loads(Path(a.hostile).read_text()))
    except OSError as exc:
        print(f"{PROG}: cannot read {a.hostile}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{PROG}: {a.hostile}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(attack, a, steps)
    except (OSError, HypercallError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0

"""The attack catalogue: what a compromised device model tries with the handles it holds.

Each attack is one step of a script (a JSON list of objects with an ``attack`` name and its
arguments) and gives one :class:`Outcome`: ``succeeded`` or ``refused`` with the errno the
daemon answered (``EACCES`` from xenstored, ``EPERM`` from a restricted privcmd, ``EBADF`` for a
handle the device model no longer has).  The attacks use only the client calls a QEMU binary
could make on the same handles (``xs_*`` on its xenstore handle, ``xenforeignmemory_map`` on
its privcmd handle).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from hypervisor_sim.privcmd import Privcmd
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.client import XsClient, XsDisconnected
from xenstored_sim.wire import XsError

PAGE_SIZE: Final = 4096
#: How long a watch listens for events after the run is told its trigger happened.
WATCH_LISTEN_S: Final = 0.5
#: The reason of a watch that registered but was told nothing.
NO_EVENT: Final = "no event"


@dataclass(slots=True)
class Outcome:
    attack: str
    target: str
    succeeded: bool
    errno: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "target": self.target,
            "result": "succeeded" if self.succeeded else "refused",
            "errno": self.errno,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Handles:
    """What the device model holds after init: ``xs`` is None once xenstore was closed."""

    xs: XsClient | None
    privcmd: Privcmd
    #: Blocks until the runner is told an attack's trigger happened (watch attacks).
    wait_trigger: Callable[[str], Awaitable[None]]


class NoHandle(Exception):
    """The attack needs a handle this device model does not have (closed by restrict)."""


def _xs(h: Handles) -> XsClient:
    if h.xs is None:
        raise NoHandle("no xenstore handle: closed by xen_restrict")
    return h.xs


async def xs_read(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    value = await _xs(h).read(str(a["path"]))
    return {"value": value.decode("utf-8", "replace")}


async def xs_write(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    await _xs(h).write(str(a["path"]), str(a["value"]))
    return {"value": str(a["value"])}


async def xs_set_perms(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    perms = [str(p) for p in a["perms"]]
    await _xs(h).set_perms(str(a["path"]), perms)
    return {"perms": perms}


async def physmap_write(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    """Write physmap entries of ``domid`` as ``xen_save_physmap`` records them
    (hw/i386/xen/xen-hvm.c), with frames the attacker chose: each entry's ``offset`` (the
    ram_addr, hex) gets ``start_addr``, ``size`` and, if given, ``name``."""
    xs = _xs(h)
    base = f"/local/domain/0/device-model/{int(a['domid'])}/physmap"
    written: list[str] = []
    for entry in a["entries"]:
        for key in ("start_addr", "size", "name"):
            if key in entry:
                await xs.write(f"{base}/{entry['offset']}/{key}", str(entry[key]))
                written.append(f"{entry['offset']}/{key}={entry[key]}")
    return {"path": base, "written": written}


async def introduce(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    await _xs(h).introduce(int(a["domid"]), int(a.get("gfn", 0xFEFFF)), int(a.get("port", 1)))
    return {}


async def release(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    await _xs(h).release(int(a["domid"]))
    return {}


async def set_target(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    await _xs(h).set_target(int(a["domid"]), int(a["target"]))
    await h.wait_trigger("set-target")  # the runner looks before a RELEASE can undo it
    return {}


async def watch(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    """Register a watch, let the runner make the event happen, count what arrives beyond the
    event every registration fires (xenstore-facts.md §4.2)."""
    path = str(a["path"])
    events: list[str] = []
    async with _xs(h).watch(path, "hostile") as w:
        await w.receive()  # the registration event
        await h.wait_trigger(path)
        with trio.move_on_after(WATCH_LISTEN_S):
            async for ev in w:
                events.append(ev.path)
    if not events:
        raise Refused(NO_EVENT, {"events": [], "registered": True})
    return {"events": events, "registered": True}


async def quota_fill(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``count`` nodes under ``path`` (relative: the connection's own home); refused
    when xenstored stops it short of ``count`` (a quota).  While the nodes exist the runner
    is asked to check that the victims can still write; then they are removed."""
    xs = _xs(h)
    path, count = str(a["path"]), int(a["count"])
    made, refused = 0, None
    for i in range(count):
        try:
            await xs.write(f"{path}/n{i}", "x" * 64)
        except XsError as exc:
            refused = exc.errno_name
            break
        made += 1
    await h.wait_trigger("quota")
    if made:
        with contextlib.suppress(XsError):
            await xs.rm(path)
    if refused is not None:
        raise Refused(refused, {"created": made, "count": count})
    return {"created": made, "count": count}


async def foreign_map(h: Handles, a: Mapping[str, Any]) -> dict[str, Any]:
    """``xenforeignmemory_map`` of another domain's frames, read through a real mmap."""
    domid, gfn, pages = int(a["domid"]), int(a["gfn"]), int(a["pages"])
    length = int(a.get("bytes", pages * PAGE_SIZE))
    fmap = await trio.to_thread.run_sync(
        h.privcmd.map_foreign, domid, [gfn + i for i in range(pages)]
    )
    bad = [e for e in fmap["errors"] if e]
    if bad:
        raise Refused(bad[0], {"pages_refused": len(bad)})
    data = bytearray()
    fd = os.open(fmap["mem_path"], os.O_RDONLY)
    try:
        for off in fmap["offsets"]:
            with mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=off) as m:
                data += m[:]
    finally:
        os.close(fd)
    return {"sha256": hashlib.sha256(bytes(data[:length])).hexdigest(), "bytes": length}


class Refused(Exception):
    def __init__(self, errno_name: str, detail: dict[str, Any]) -> None:
        super().__init__(errno_name)
        self.errno_name = errno_name
        self.detail = detail


Attack = Callable[[Handles, Mapping[str, Any]], Awaitable[dict[str, Any]]]

CATALOGUE: Final[dict[str, Attack]] = {
    "xs-read": xs_read,
    "xs-write": xs_write,
    "xs-set-perms": xs_set_perms,
    "physmap-plant": physmap_write,
    "physmap-own": physmap_write,
    "introduce": introduce,
    "release": release,
    "set-target": set_target,
    "watch": watch,
    "quota-fill": quota_fill,
    "foreign-map": foreign_map,
}


def target_of(step: Mapping[str, Any]) -> str:
    """The thing an attack aims at, for the report."""
    for key in ("path", "target", "domid"):
        if key in step:
            return f"{key}={step[key]}"
    return ""


async def run_one(h: Handles, step: Mapping[str, Any]) -> Outcome:
    name = str(step["attack"])
    out = Outcome(name, str(step.get("label") or target_of(step)), False)
    try:
        out.detail = await CATALOGUE[name](h, step)
        out.succeeded = True
    except NoHandle as exc:
        out.errno, out.detail = "EBADF", {"reason": str(exc)}
    except Refused as exc:
        out.errno, out.detail = exc.errno_name, exc.detail
    except XsError as exc:
        out.errno, out.detail = exc.errno_name, {"reason": str(exc)}
    except XsDisconnected as exc:
        out.errno, out.detail = "EPIPE", {"reason": f"xenstore connection lost: {exc}"}
    except HypercallError as exc:
        out.errno, out.detail = exc.errno_name, {"reason": str(exc)}
    return out


def check_script(script: object) -> list[dict[str, Any]]:
    """The steps of a script, or ValueError naming what is wrong."""
    if not isinstance(script, list):
        raise ValueError("the script must be a JSON list of attacks")
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(script):
        if not isinstance(step, dict) or step.get("attack") not in CATALOGUE:
            known = ", ".join(sorted(CATALOGUE))
            raise ValueError(f"step {i}: 'attack' must be one of {known}")
        steps.append(step)
    return steps

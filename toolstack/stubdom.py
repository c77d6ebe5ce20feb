"""Device-model stub domains: the domain, its xenstore identity and the grants it gets.

As libxl does for ``device_model_stubdomain_override`` (``libxl_dm.c``, ``libxl__spawn_stub_dm``;
docs/qemu-physmap.md, 'Stub domains', docs/xenstore.md, 'SET_TARGET and stub domains'): the
toolstack creates a small domain for the device model, introduces it to xenstored (which opens
``RUNDIR/domains/<stub>.sock``, its ring), makes it the guest's target holder with SET_TARGET,
records it in ``/local/domain/<domid>/image/device-model-domid`` and makes
``/local/domain/<stub>/device-model/<domid>`` owned by the stub and readable by the guest.  The
device model then speaks xenstore only through the stub's socket, as an unprivileged domain, with
the grants of :mod:`toolstack.dmperms` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Final

import trio

import xenhost
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.wire import XsError

from .dmperms import matches, merge, parse_grant, split_wildcard, with_entry
from .emulator_xenstore import dm_root
from .session import Session

#: A stub domain's memory in this model: it runs nothing, it only has to exist.
STUB_PAGES: Final = 256
#: The stub's xenstore ring page and event channel handed to INTRODUCE.
STUB_STORE_GFN: Final = 0xFEFFE
STUB_STORE_PORT: Final = 1
#: How long xenstored may take to open the stub's socket after INTRODUCE.
SOCKET_WAIT: Final = 5.0


def guest_socket(lx: Session, stub: int) -> Path:
    return xenhost.RunDir(lx.run.root).guest_socket(stub)


async def stub_of(lx: Session, domid: int) -> int | None:
    """``libxl_get_stubdom_id``: the stub domain serving ``domid``, ``None`` if it has none."""
    raw = await lx.xs_read(f"/local/domain/{domid}/image/device-model-domid")
    if raw is None or not raw.isdigit() or int(raw) == 0:
        return None
    return int(raw)


async def build(lx: Session, domid: int, grants: Sequence[str]) -> int:
    """Create the stub domain for guest ``domid`` and grant it ``grants``; returns its domid.

    The device model is to connect to :func:`guest_socket`.  If a step fails, what was made
    is removed again before the error propagates.
    """
    name = await lx.xs_read(f"/local/domain/{domid}/name") or f"domain-{domid}"
    stub = int(
        (await lx.hv_call("domain_create", name=f"{name}-dm", max_pages=STUB_PAGES, hvm=False))[
            "domid"
        ]
    )
    try:
        await _make(lx, stub, domid, f"{name}-dm", grants)
    except BaseException:
        with trio.CancelScope(shield=True):
            await destroy(lx, stub)
        raise
    return stub


async def _make(lx: Session, stub: int, domid: int, name: str, grants: Sequence[str]) -> None:
    sdom = f"/local/domain/{stub}"
    await lx.xs_rm(sdom)
    await _mknod(lx, sdom, ["n0", f"r{stub}"])
    await lx.xs_write(f"{sdom}/name", name)
    await lx.xs_write(f"{sdom}/domid", str(stub))
    await lx.xs_write(f"{sdom}/target", str(domid))
    try:
        await lx.xs.introduce(stub, STUB_STORE_GFN, STUB_STORE_PORT)
        lx.audit.record("xs_introduce", domid=stub)
        # xs_set_target: the stub acts as owner of the guest's nodes (docs/xenstore.md, 'SET_TARGET
        # and stub domains').
        await lx.xs.set_target(stub, domid)
        lx.audit.record("xs_set_target", domid=stub, call=f"{stub} {domid}")
    except XsError as exc:
        lx.audit.record("xs_stubdom", exc.errno_name, domid=stub)
        raise
    await lx.xs_write(f"/local/domain/{domid}/image/device-model-domid", str(stub))
    # DEVICE_MODEL_XS_PATH(stub, domid): owned by the stub, readable by the guest.
    await _mknod(lx, dm_root(domid, stub), [f"n{stub}", f"r{domid}"])
    await grant(lx, stub, domid, grants)
    sock = guest_socket(lx, stub)
    with trio.fail_after(SOCKET_WAIT):
        while not sock.exists():
            await trio.sleep(0.01)


async def _mknod(lx: Session, path: str, perms: list[str]) -> None:
    await lx.xs_write(path, "")
    await lx.xs_call("set_perms", path, lx.xs.set_perms(path, perms))


async def grant(lx: Session, stub: int, domid: int, grants: Sequence[str]) -> dict[str, str]:
    """Give ``stub`` exactly ``grants`` for guest ``domid`` by SET_PERMS; returns the letter
    each node got.  A node a grant names that does not exist yet is made (by dom0, so it keeps
    its parent's owner) so that it can carry the entry."""
    letters: dict[str, set[str]] = {}
    for text in grants:
        g = parse_grant(text)
        path = g.path(domid)
        top, pattern = split_wildcard(path)
        for access in ("r", "w") if g.access == "b" else (g.access,):
            letters.setdefault(top, set()).add(access)
            for node in await _existing(lx, top, pattern):
                letters.setdefault(node, set()).add(access)
    given: dict[str, str] = {}
    for node in sorted(letters):
        if await lx.xs_read(node) is None:
            await lx.xs_call("mkdir", node, lx.xs.mkdir(node))
        perms = await lx.xs_call("get_perms", node, lx.xs.get_perms(node))
        letter = merge(letters[node])
        await lx.xs_call("set_perms", node, lx.xs.set_perms(node, with_entry(perms, stub, letter)))
        given[node] = letter
    return given


async def _existing(lx: Session, top: str, pattern: list[str]) -> list[str]:
    """The nodes under ``top`` whose components below it match ``pattern``."""
    if not pattern:
        return []
    found: list[str] = []

    async def walk(path: str, depth: int, parts: list[str]) -> None:
        if depth == len(pattern):
            if matches(pattern, parts):
                found.append(path)
            return
        for child in await lx.xs_directory(path):
            if pattern[depth] in ("*", child):
                await walk(f"{path}/{child}", depth + 1, [*parts, child])

    await walk(top, 0, [])
    return found


async def destroy(lx: Session, stub: int) -> None:
    """Remove the stub domain's tree, release it (xenstored drops its socket, the nodes it owns
    and every ACL entry naming it, docs/xenstore.md, 'Domains') and destroy it."""
    await lx.xs_rm(f"/local/domain/{stub}")
    try:
        await lx.xs.release(stub)
        lx.audit.record("xs_release", domid=stub)
    except XsError as exc:
        # Never introduced (a build that failed early): nothing to release.
        lx.audit.record("xs_release", exc.errno_name, domid=stub)
    with suppress(HypercallError):
        await lx.hv_call("domain_destroy", domid=stub)

"""Every attack read back from the victim's side, as the toolstack and the victims see it.

A success the attacker reports counts only if the victim's side shows it: the victim's node
as the toolstack reads it back, the victim's own read of its node, the victim's screen after a
save and restore (QMP ``x-physmap-info`` and a ``screendump`` PNG), the domains xenstored
knows, and what a victim can still write while the attacker holds its nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from toolstack.libxl.dom import STORE_GFN, STORE_PORT
from toolstack.qmp import QmpError, QmpProtocolError, open_qmp

from ...demo import StepError, pattern_sha256
from .screens import corner_png
from .script import DEVICE, SCRATCH_DOMID, SECRET_GPA, SECRET_SEEDS, SEEDS, Host, secret_node

if TYPE_CHECKING:
    from .configs import HostileConfig
    from .outcome import ConfigRun
    from .victims import Victims

#: The domain the toolstack introduces while the attacker watches ``@introduceDomain``.
WATCHED_DOMID: Final = SCRATCH_DOMID + 1


@dataclass(slots=True)
class Seen:
    """What the triggers observed while the attacker ran."""

    watch_trigger: bool = False
    write_during_fill: str | None = None
    #: Guest A's read of V2's node right after SET_TARGET (ok, value or errno).
    target_read: tuple[bool, str] | None = None


@dataclass(slots=True)
class Before:
    secret_v1: str
    perms_v1: list[str] = field(default_factory=list)


async def before(v: Victims, host: Host) -> Before:
    node = secret_node(host.v1)
    return Before((await v.xs.read(node)).decode(), await v.xs.get_perms(node))


async def trigger(v: Victims, host: Host, what: str, seen: Seen) -> None:
    """Make the event a waiting attack listens for happen, from the toolstack's side."""
    if what == "@introduceDomain":
        await v.xs.introduce(WATCHED_DOMID, STORE_GFN, STORE_PORT)
        await v.xs.release(WATCHED_DOMID)
        seen.watch_trigger = True
    elif what == "set-target":
        seen.target_read = await v.guest_xs(host.attacker, "xs_read", secret_node(host.v2))
    elif what == "quota":
        ok, got = await v.guest_xs(host.v1, "xs_write", f"/local/domain/{host.v1}/data/filled", "1")
        seen.write_during_fill = "ok" if ok else got


async def after(
    v: Victims,
    cfg: HostileConfig,
    host: Host,
    out: ConfigRun,
    was: Before,
    seen: Seen,
    live: set[int],
) -> None:
    cells = {c.attack: c for c in out.cells}
    node = secret_node(host.v1)
    now = (await v.xs.read(node)).decode()
    perms = await v.xs.get_perms(node)
    own_ok, own = await v.guest_xs(host.v1, "xs_read", node)

    def put(attack: str, effect: bool, text: str) -> None:
        cells[attack].effect, cells[attack].victim = effect, text

    got = str(cells["xs-read"].detail.get("value", ""))
    put("xs-read", got == was.secret_v1, f"toolstack reads {was.secret_v1!r}")
    put("xs-write", now != was.secret_v1, f"toolstack reads {now!r}")
    put(
        "xs-set-perms",
        perms != was.perms_v1,
        f"perms {' '.join(perms)}; V1 reads its node: {'ok' if own_ok else own}",
    )
    (fb,) = await v.driver(host.v2, "sha256")
    mapped = cells["foreign-map"].detail.get("sha256")
    put("foreign-map", mapped == fb, f"V2 reads its framebuffer as {str(fb)[:12]}")
    events = cells["watch"].detail.get("events") or []
    put("watch", bool(events), f"toolstack introduced d{WATCHED_DOMID}: {len(events)} event(s)")
    fill, made = seen.write_during_fill, cells["quota-fill"].detail.get("created", 0)
    starved = fill is not None and fill != "ok"
    put("quota-fill", starved, f"attacker made {made} nodes; V1 writes meanwhile: {fill or '-'}")
    await _domains(v, host, seen, put)
    for attack, role, domid in (
        ("physmap-plant", "V1", host.v1),
        ("physmap-own", "A", host.attacker),
    ):
        effect, text = await _restore_screen(v, cfg, role, domid, live, out)
        put(attack, effect, text)


async def _domains(v: Victims, host: Host, seen: Seen, put: Any) -> None:
    scratch = await v.xs.is_domain_introduced(SCRATCH_DOMID)
    if scratch:
        await v.xs.release(SCRATCH_DOMID)
    put("introduce", scratch, f"xenstored knows d{SCRATCH_DOMID}: {scratch}")
    if seen.target_read is None:
        ok, got = await v.guest_xs(host.attacker, "xs_read", secret_node(host.v2))
    else:
        ok, got = seen.target_read
    put(
        "set-target",
        ok,
        f"guest A reads V2's node: {got!r}" if ok else f"guest A reads V2's node: {got}",
    )
    alive = await v.xs.is_domain_introduced(host.v2)
    put("release", not alive, f"xenstored knows V2: {alive}")
    if not alive:  # the toolstack puts it back, so that it can be destroyed as usual
        await v.xs.introduce(host.v2, STORE_GFN, STORE_PORT)


async def _restore_screen(
    v: Victims, cfg: HostileConfig, role: str, domid: int, live: set[int], out: ConfigRun
) -> tuple[bool, str]:
    """Save ``domid`` and restore it with a dom0 device model: the keys the image carried and
    what the restored screen shows.  The attack took effect if the image carried the
    attacker's frames and the restore shows anything but the guest's own screen."""
    image = v.run.rundir / "images" / f"hostile-{cfg.name}-{role}.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = await v.run.xl("save", str(domid), str(image))
        live.discard(domid)
        keys = dict(saved.get("xenstore_keys") or {})
        starts = sorted(val for k, val in keys.items() if k.endswith("/start_addr"))
        carried = f"image carries start_addr {', '.join(starts) or 'none'}"
        planted = f"{SECRET_GPA:x}" in starts
        try:
            restored = await v.run.xl("restore", str(image), "--no-dm-stubdom", "--no-dm-restrict")
        except StepError as exc:
            why = str(exc).rsplit(": ", 1)[-1][:70]
            return planted, f"{role}'s restore aborts ({why}); {carried}"
        new = int(restored["domid"])
        live.add(new)
        shown = (await v.run.physmap_info(new)).get("display_sha256")
        if role == "V1":
            await _screendump(v, new, cfg.name, out)
    finally:
        image.unlink(missing_ok=True)
    if shown == pattern_sha256(DEVICE, SEEDS[role]):
        return False, f"{role}'s screen intact after restore; {carried}"
    if shown == pattern_sha256(DEVICE, SECRET_SEEDS[role]):
        return True, f"{role}'s screen shows its secret RAM page at {SECRET_GPA:#x}; {carried}"
    return True, f"{role}'s screen is wrong after restore ({str(shown)[:12]}); {carried}"


async def _screendump(v: Victims, domid: int, name: str, out: ConfigRun) -> None:
    """QMP ``screendump`` of the restored screen; its corner goes to the report's screens."""
    if v.shots is None:
        return
    dump = (v.run.rundir / f"screendump-{domid}.ppm").resolve()
    try:
        async with open_qmp(v.run.rundir / "qmp" / f"{domid}.sock") as qmp:
            await qmp.execute("screendump", {"filename": str(dump), "format": "ppm"})
        corner = corner_png(dump.read_bytes())
    except (QmpError, QmpProtocolError, OSError, ValueError):
        return
    finally:
        dump.unlink(missing_ok=True)
    path = v.shots / f"hostile-{name}-after-restore.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(corner)
    out.screens[name] = str(path)

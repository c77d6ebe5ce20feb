"""Run the attacker of each configuration on a stack with two victim guests.

For each configuration: create the victims V1 and V2 (device models in dom0, the
configuration's mode), each drawing a seeded screen and keeping a secret page in RAM and a
secret node it owns in xenstore; create the attacker's guest A with the configuration's device
model; read the ACLs the predictor needs; start ``qemu-model --hostile`` with A's device
model's credentials; then read every attack's effect back from the victims' side
(:mod:`.evidence`).  Every domain made is destroyed again.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from hypervisor_sim.client import HypervisorClient, open_hypervisor
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.wire import XsError

from ...demo import BAR_ADDR, BPP, GUEST_MEMORY_MIB, HEIGHT, WIDTH, DemoRun, StepError
from ...stack import executable, open_stack
from . import evidence
from .configs import HostileConfig
from .predict import Prediction, Principal, predict, touched, visible
from .script import DEVICE, SECRET_GPA, SECRET_SEEDS, SEEDS, Host, secret_node, steps

#: A configuration that takes longer than this has hung (a normal one takes about 25 s).
CONFIG_LIMIT_S: Final = 300.0
#: xenstored-sim's default node quota (C 4.17's), which the attacker's fill overruns.
NODE_QUOTA: Final = 1000


@dataclass(slots=True)
class AttackCell:
    config: str
    attack: str
    label: str
    result: str
    errno: str | None
    predicted: Prediction
    detail: dict[str, Any]
    #: What the victim's side shows, and whether it shows the attack's effect.
    victim: str = ""
    effect: bool = False
    #: Whether the victim's side should show it (:func:`.predict.visible`).
    expected_effect: bool = False

    @property
    def as_predicted(self) -> bool:
        """The request's outcome and its visibility to the victim, as predicted."""
        p = self.predicted
        same = (self.result == "succeeded") == p.succeeded
        return (
            same and (p.succeeded or self.errno == p.errno) and self.effect == self.expected_effect
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "attack": self.attack,
            "label": self.label,
            "result": self.result,
            "errno": self.errno,
            "predicted": self.predicted.as_json(),
            "as_predicted": self.as_predicted,
            "detail": self.detail,
            "victim": self.victim,
            "effect": self.effect,
            "expected_effect": self.expected_effect,
        }


@dataclass(slots=True)
class ConfigRun:
    config: HostileConfig
    principal: Principal | None = None
    domids: dict[str, int] = field(default_factory=dict)
    cells: list[AttackCell] = field(default_factory=list)
    screens: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class Victims:
    """The toolstack's view: xl-sim steps and a privileged xenstore connection."""

    def __init__(
        self, run: DemoRun, xs: XsClient, hv: HypervisorClient, shots: Path | None
    ) -> None:
        self.run = run
        self.xs = xs
        self.hv = hv
        self.shots = shots
        #: Each domain's device-model pid, as ``xl-sim create`` or ``restore`` reported it.
        self.dm_pids: dict[int, int] = {}

    def started(self, out: dict[str, Any]) -> int:
        domid = int(out["domid"])
        if isinstance(out.get("dm_pid"), int):
            self.dm_pids[domid] = int(out["dm_pid"])
        return domid

    async def guest(self, role: str, name: str, extra: Sequence[str]) -> int:
        out = await self.run.xl(
            "create", "--name", name, "--memory", str(GUEST_MEMORY_MIB), "--vga", DEVICE, *extra
        )
        domid = self.started(out)
        await self.draw(role, domid)
        return domid

    async def driver(self, domid: int, action: str, **params: int) -> Any:
        """The guest's own driver (``xl-sim guest``), run on its vCPU by the hypervisor."""
        mode = {"width": WIDTH, "height": HEIGHT, "bpp": BPP, "addr": BAR_ADDR}
        return await self.hv.guest_driver(domid, DEVICE, action, {**mode, **params})

    async def draw(self, role: str, domid: int) -> None:
        await self.driver(domid, "map_bar")
        await self.driver(domid, "set_mode")
        await self.driver(domid, "draw", seed=SEEDS[role])
        # The guest's secret page: its RAM at SECRET_GPA, which no screen shows.
        await self.driver(domid, "draw", addr=SECRET_GPA, seed=SECRET_SEEDS[role])
        node = secret_node(domid)
        await self.xs.write(node, f"secret of {role}")
        await self.xs.set_perms(node, [f"n{domid}"])

    async def guest_xs(self, domid: int, op: str, path: str, value: str = "") -> tuple[bool, str]:
        """A xenstore request the guest itself makes on its own socket: ok and the value, or
        the errno."""
        step: dict[str, Any] = {"op": op, "path": path}
        if op == "xs_write":
            step["value"] = value
        try:
            (got,) = await self.hv.guest(domid, [step])
        except HypercallError as exc:
            return False, exc.errno_name
        return True, got.decode() if isinstance(got, bytes) else str(got)

    async def stub_of(self, domid: int) -> int | None:
        """``libxl_get_stubdom_id``: the stub domain serving ``domid``, if it has one."""
        try:
            raw = (await self.xs.read(f"/local/domain/{domid}/image/device-model-domid")).decode()
        except XsError:
            return None
        return int(raw) if raw.isdigit() and int(raw) else None

    async def acls(self, paths: Sequence[str]) -> dict[str, list[str]]:
        """The ACL of every node on the way to ``paths`` (missing nodes left out)."""
        out: dict[str, list[str]] = {}
        for path in paths:
            p = path
            while p and p not in out:
                with suppress(XsError):
                    out[p] = await self.xs.get_perms(p)
                p = p.rsplit("/", 1)[0] if p.count("/") > 1 else ("/" if p != "/" else "")
        return out


def dm_arguments(pid: int) -> list[str]:
    """The options a running device model was started with (``/proc/PID/cmdline``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as exc:
        raise StepError(f"device model pid {pid}: {exc.strerror}") from None
    args = [a.decode(errors="replace") for a in argv if a]
    first = next((i for i, a in enumerate(args) if a.startswith("-") and i > 0), len(args))
    return args[first:]


def _principal(cfg: HostileConfig, domid: int, stub: int | None) -> Principal:
    """The credentials of domain ``domid``'s device model after init, for the predictor."""
    if stub is not None:
        return Principal("domain", stub, domid, domid)
    hv = domid if cfg.restrict else None
    closed = cfg.restrict and tuple(int(x) for x in cfg.qemu_version.split(".")[:2]) >= (3, 0)
    return Principal("none" if closed else "dom0", 0, None, hv)


async def _attacker(
    v: Victims,
    cfg: HostileConfig,
    dm_args: Sequence[str],
    script: list[dict[str, Any]],
    trigger: Callable[[str], Any],
) -> list[dict[str, Any]]:
    path = v.run.rundir / f"hostile-{cfg.name}.json"
    path.write_text(json.dumps(script))
    argv = [executable("qemu-model"), "--hostile", str(path), *dm_args, *cfg.attacker_args()]
    results: list[dict[str, Any]] = []
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "trigger" in msg:
                    await trigger(str(msg["trigger"]))
                    await proc.stdin.send_all(b"\n")
                else:
                    results.append(msg)
        status = await proc.wait()
        err = await proc.stderr.receive_some(65536)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if status != 0:
        raise StepError(f"qemu-model --hostile exited {status}: {err.decode(errors='replace')}")
    return results


async def run_config(v: Victims, cfg: HostileConfig) -> ConfigRun:
    out = ConfigRun(cfg)
    t0 = time.monotonic()
    live: set[int] = set()
    try:
        with trio.fail_after(CONFIG_LIMIT_S):
            await _run(v, cfg, out, live)
    except (StepError, XsError, HypercallError, trio.TooSlowError) as exc:
        out.error = str(exc) or type(exc).__name__
    finally:
        with trio.CancelScope(shield=True):
            for domid in sorted(live):
                with suppress(StepError, trio.TooSlowError):
                    await v.run.xl("destroy", str(domid))
    out.seconds = time.monotonic() - t0
    return out


async def _run(v: Victims, cfg: HostileConfig, out: ConfigRun, live: set[int]) -> None:
    mode = ["--dm-mode", cfg.mode]
    for role in ("V1", "V2"):
        out.domids[role] = await v.guest(role, f"{cfg.name}-{role}", mode)
        live.add(out.domids[role])
    a = await v.guest("A", f"{cfg.name}-A", cfg.create_args())
    live.add(a)
    if cfg.restore_into_stub:
        image = v.run.rundir / "images" / f"hostile-{cfg.name}-A.img"
        image.parent.mkdir(parents=True, exist_ok=True)
        await v.run.xl("save", str(a), str(image))
        live.discard(a)
        a = v.started(await v.run.xl("restore", str(image), *cfg.stub_args()))
        live.add(a)
        image.unlink(missing_ok=True)
    out.domids["A"] = a
    stub = await v.stub_of(a)
    principal = _principal(cfg, a, stub)
    out.principal = principal
    # The attacker takes the device model's own options: its sockets, its restriction.
    dm_args = dm_arguments(v.dm_pids[a])
    info = await v.run.physmap_info(out.domids["V1"])
    fb_gfn, fb_bytes = BAR_ADDR >> 12, WIDTH * HEIGHT * BPP // 8
    host = Host(
        attacker=a,
        v1=out.domids["V1"],
        v2=out.domids["V2"],
        offset=f"{int(info['phys_offset']):x}",
        vram_size=int(info["vram_size"]),
        bar_addr=BAR_ADDR,
        fb_gfn=fb_gfn,
        fb_bytes=fb_bytes,
        node_quota=NODE_QUOTA,
    )
    script = steps(host)
    acls = await v.acls([p for s in script for p in touched(s, principal)])
    before = await evidence.before(v, host)
    seen = evidence.Seen()
    results = await _attacker(v, cfg, dm_args, script, lambda t: evidence.trigger(v, host, t, seen))
    for s, r in zip(script, results, strict=True):
        pred = predict(principal, s, acls, NODE_QUOTA)
        seen_effect = visible(cfg.mode, cfg.stubdom, str(s["attack"]), pred.succeeded)
        out.cells.append(
            AttackCell(
                cfg.name,
                str(s["attack"]),
                str(s["label"]),
                str(r["result"]),
                r.get("errno"),
                pred,
                dict(r.get("detail") or {}),
                expected_effect=seen_effect,
            )
        )
    await evidence.after(v, cfg, host, out, before, seen, live)


async def run_hostile(
    configs: Sequence[HostileConfig],
    *,
    shots: Path | None = None,
    progress: Callable[[str], None] = lambda _m: None,
    keep_rundir: Path | None = None,
) -> list[ConfigRun]:
    """Every configuration on one fresh stack (audit logs on), in a temporary run directory."""
    import tempfile

    runs: list[ConfigRun] = []
    with tempfile.TemporaryDirectory(prefix="physmap-hostile-") as tmp:
        rundir = Path(keep_rundir or tmp)
        async with open_stack(rundir, audit=True) as stack:
            run = DemoRun(rundir, report=lambda _m: None)
            async with (
                open_xenstore(stack.xenstored_socket) as xs,
                open_hypervisor(stack.hypervisor_socket) as hv,
            ):
                v = Victims(run, xs, hv, shots)
                for cfg in configs:
                    progress(f"hostile {cfg.name}")
                    runs.append(await run_config(v, cfg))
    return runs

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
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.client import open_xenstore
from xenstored_sim.wire import XsError

from ...demo import BAR_ADDR, BPP, HEIGHT, WIDTH, DemoRun, StepError
from ...stack import executable, open_stack
from . import evidence
from .configs import HostileConfig
from .outcome import AttackCell, ConfigRun
from .predict import Principal, predict, touched, visible
from .script import Host, steps
from .victims import Victims

#: A configuration that takes longer than this has hung (a normal one takes about 25 s).
CONFIG_LIMIT_S: Final = 300.0
#: xenstored-sim's default node quota (C 4.17's), which the attacker's fill overruns.
NODE_QUOTA: Final = 1000


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

"""The steps of the whole-stack random walk (:mod:`physmap_lab.soak`), each with its weight.

Each step drives the stack through a public interface and updates the walk's model with what
must now be true; the walk checks the model against the stack after every step.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from toolstack.config import DM_MODES, VGA_CHOICES
from xenhost import RunDir, device_model_domains, device_models

from .soak_walk import (
    CORRUPTS,
    MAX_DOMAINS,
    MODE,
    Domain,
    Image,
    Run,
    Walk,
    WalkFailure,
)
from .stack import executable


def create(w: Walk) -> None:
    if len(w.domains) >= MAX_DOMAINS:
        return destroy(w)
    w.counter += 1
    name = f"g{w.counter}"
    vga, mode = w.rng.choice(VGA_CHOICES), w.rng.choice(DM_MODES)
    out = w.must("create", "--name", name, "--memory", "16", "--vga", vga, "--dm-mode", mode)
    w.add(int(out["domid"]), Domain(name, vga, mode))
    return None


def _guest(w: Walk, domid: int, dom: Domain, *args: str) -> dict[str, Any] | None:
    """A guest action: fails on a paused domain, succeeds on a running one with its device
    model; without a device model either may happen.  Returns the output on success."""
    if dom.paused:
        w.must_fail("guest", str(domid), *args)
        return None
    if not dom.dm_alive:
        run = w.xl("guest", str(domid), *args)
        return run.out if run.rc == 0 else None
    return w.must("guest", str(domid), *args)


def draw(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, dom = picked
    if not dom.mapped and _guest(w, domid, dom, "map-bar") is not None:
        dom.mapped = True
    if _guest(w, domid, dom, "set-mode", *MODE) is None:
        return
    seed = str(w.rng.randrange(1 << 31))
    if _guest(w, domid, dom, "draw", "--seed", seed, *MODE) is None:
        return
    out = _guest(w, domid, dom, "fb-hash", *MODE)
    dom.fb = str(out["sha256"]) if out is not None and dom.dm_alive else None


def read_back(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, dom = picked
    if dom.paused:
        w.must_fail("guest", str(domid), "fb-hash", *MODE)
    else:
        w.check_fb(domid, dom)


def xenstore(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, dom = picked
    others = [d for d in w.domains if d != domid] or [domid + 1]
    other = w.rng.choice(others)
    choice = w.rng.randrange(5)
    if choice == 0:
        out = _guest(w, domid, dom, "xs-read", "name")
        if out is not None and out["value"] != dom.name:
            raise WalkFailure(f"domain {domid} reads its name as {out['value']!r}")
    elif choice == 1:
        w.xl("guest", str(domid), "xs-write", "data/walk", str(w.rng.randrange(1000)))
    elif choice == 2:
        w.xl("guest", str(domid), "xs-read", f"/local/domain/{other}/name")
    elif choice == 3:
        w.xl("guest", str(domid), "xs-write", f"/local/domain/{other}/data/x", "intruder")
    else:
        w.must_fail("guest", str(domid), "xs-read", "no/such/node")


def pause(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, dom = picked
    if dom.paused:
        w.must("unpause", str(domid))
        dom.paused = False
    elif dom.dm_alive:
        w.must("pause", str(domid))
        dom.paused = True
    elif w.xl("pause", str(domid)).rc == 0:
        dom.paused = True


def save(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, dom = picked
    checkpoint = w.rng.random() < 0.4
    w.counter += 1
    path = w.root / f"img{w.counter}.img"
    args = ["save", *(["--checkpoint"] if checkpoint else []), str(domid), str(path)]
    run = w.xl(*args)
    if run.rc != 0 and not dom.paused and dom.dm_alive:
        raise WalkFailure(f"xl-sim {' '.join(args)} failed: {run.err.strip()}")
    _saved(w, domid, path, bool(checkpoint), run)


def _saved(w: Walk, domid: int, path: Path, checkpoint: bool, run: Run) -> None:
    """The model after a save.  The image is complete under its name, or not there at all;
    once it is, the save is done even if the domain's destroy or resume after it failed."""
    dom = w.domains[domid]
    if path.with_name(path.name + ".tmp").exists():
        raise WalkFailure(f"save left {path}.tmp behind")
    if not path.exists():
        if run.rc == 0:
            raise WalkFailure(f"save reported success but {path} is missing")
        # A save that failed after pausing the domain leaves it paused, and says so; one
        # that failed before (xenstored gone at the start) leaves it as it was.
        if "left paused" in run.err:
            dom.paused = True
        return
    w.images.append(Image(path, replace(dom)))
    if not checkpoint:
        del w.domains[domid]  # destroyed by the save (what a failed destroy left, list shows)
    else:
        dom.paused = run.rc != 0  # a checkpoint resumes the domain (libxl__domain_resume)


def restore(w: Walk) -> None:
    if not w.images or len(w.domains) >= MAX_DOMAINS:
        return None
    image = w.rng.choice(w.images)
    if any(d.name == image.dom.name for d in w.domains.values()):
        w.must_fail("restore", str(image.path))
        return None
    domid = int(w.must("restore", str(image.path))["domid"])
    intact = (image.dom.mode, image.dom.vga) not in CORRUPTS and image.dom.dm_alive
    dom = replace(image.dom, paused=False, dm_alive=True, fb=image.dom.fb if intact else None)
    w.add(domid, dom)
    w.check_fb(domid, dom)
    return None


def destroy(w: Walk) -> None:
    picked = w.pick()
    if picked is None:
        return
    domid, _ = picked
    w.must("destroy", str(domid))
    del w.domains[domid]


def qmp(w: Walk) -> None:
    live = [(i, d) for i, d in w.domains.items() if d.dm_alive]
    if not live:
        return
    domid, dom = w.rng.choice(live)
    status = qmp_query_status(str(RunDir(w.run).qmp_socket(domid)))
    want = "paused" if dom.paused else "running"
    if status != want:
        raise WalkFailure(f"QMP query-status of domain {domid}: {status}, expected {want}")


def qmp_query_status(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        try:
            s.connect(path)
        except OSError as exc:
            raise WalkFailure(f"QMP {path}: {exc}") from None
        f = s.makefile("rwb")
        replies: list[dict[str, Any]] = []
        for line in (b"", b'{"execute": "qmp_capabilities"}', b'{"execute": "query-status"}'):
            if line:
                f.write(line + b"\n")
                f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    replies.append(msg)
                    break
        result = replies[-1].get("return")
        if not isinstance(result, dict):
            raise WalkFailure(f"QMP query-status: {replies[-1]}")
        return str(result["status"])


def second_daemon(w: Walk) -> None:
    """Another daemon on the same run directory must refuse to start and leave the first be."""
    live = [(i, d) for i, d in w.domains.items() if d.dm_alive]
    which = w.rng.choice(["xenstored", "hypervisor", *(["qemu-model"] if live else [])])
    if which == "qemu-model":
        domid, dom = w.rng.choice(live)
        argv = ["qemu-model", "--domid", str(domid), "--rundir", str(w.run), "--vga", dom.vga]
    else:
        argv = w.daemon_argv(which)[0]
    proc = subprocess.run(
        [executable(argv[0]), *argv[1:]],
        capture_output=True,
        env=w.env(),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 1 or len(err.splitlines()) != 1 or "Traceback" in err:
        raise WalkFailure(f"a second {which} exited {proc.returncode}: {err!r}")
    if which == "qemu-model":
        qmp(w)


def kill(w: Walk) -> None:
    """SIGKILL one process; restart a daemon; the model forgets what died with it."""
    dms = [(i, d) for i, d in w.domains.items() if d.dm_alive]
    which = w.rng.choice(["xenstored", "hypervisor", *(["dm"] if dms else [])])
    if which == "dm":
        domid, dom = w.rng.choice(dms)
        listed = {int(d["domid"]): d for d in w.must("list")["domains"]}
        os.kill(int(listed[domid]["dm_pid"]), signal.SIGKILL)
        dom.dm_alive = False
        return
    proc = w.procs.pop(which)
    proc.kill()
    proc.wait()
    if which == "hypervisor":
        # The domains die with it, and so do their device models (lost the hypervisor).
        w.lose_domains()
        _wait_for_device_models_to_exit(w)
    w.start(which)
    if which == "xenstored":
        _device_models_lose_xenstore(w)


def _device_models_lose_xenstore(w: Walk) -> None:
    """A device model's xenstore connection does not survive its daemon: QEMU 2.10 exits at
    its next state write ("error recording dm state", xenstore_record_dm_state()), which may
    come at any later resume.  The walk settles that at once: they go now."""
    listed = {int(d["domid"]): d for d in w.must("list")["domains"]}
    for domid, dom in w.domains.items():
        pid = int(listed.get(domid, {}).get("dm_pid") or 0)
        if dom.dm_alive and pid > 0:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            dom.dm_alive = False


def _wait_for_device_models_to_exit(w: Walk) -> None:
    deadline = time.monotonic() + 30
    while device_models(w.run):
        if time.monotonic() > deadline:
            raise WalkFailure(f"device models outlived the hypervisor: {device_models(w.run)}")
        time.sleep(0.05)


def _command(w: Walk) -> tuple[str, list[str], Any]:
    """A long command to interrupt: a create, a save of a running domain or a restore."""
    running = [(i, d) for i, d in w.domains.items() if not d.paused and d.dm_alive]
    free = [im for im in w.images if all(d.name != im.dom.name for d in w.domains.values())]
    kind = w.rng.choice(["create", "save", "restore"])
    w.counter += 1
    if kind == "save" and running:
        domid, _ = w.rng.choice(running)
        path = w.root / f"img{w.counter}.img"
        checkpoint = ["--checkpoint"] if w.rng.random() < 0.4 else []
        return "save", ["save", *checkpoint, str(domid), str(path)], (domid, path, checkpoint)
    if kind == "restore" and free and len(w.domains) < MAX_DOMAINS:
        image = w.rng.choice(free)
        return "restore", ["restore", str(image.path)], image
    if len(w.domains) >= MAX_DOMAINS:
        return "none", ["list"], None
    vga, mode = w.rng.choice(VGA_CHOICES), w.rng.choice(DM_MODES)
    args = ["create", "--name", f"g{w.counter}", "--memory", "16", "--vga", vga]
    return "create", [*args, "--dm-mode", mode], Domain(f"g{w.counter}", vga, mode)


def kill_during(w: Walk) -> None:
    """SIGKILL one process at a random point of a long command; the command succeeds or
    fails cleanly, and the model follows what it says."""
    kind, args, ctx = _command(w)
    target = w.rng.choice(["xenstored", "hypervisor", "dm"])
    delay = w.rng.uniform(0.0, 1.0)
    killed: list[int] = []

    def during() -> None:
        time.sleep(delay)
        if target != "dm":
            proc = w.procs[target]
            proc.kill()
            proc.wait()
            return
        dms = device_model_domains(w.run)
        if dms:
            pid = w.rng.choice(sorted(dms))
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(dms[pid])

    run = w.xl(*args, during=during)
    w.history[-1] += f"({' '.join(args[:2])}, {target} at {delay:.2f} s: {run.rc})"
    if target == "hypervisor":
        w.procs.pop("hypervisor")
        _wait_for_device_models_to_exit(w)
        w.start("hypervisor")
    elif target == "xenstored":
        w.procs.pop("xenstored")
        w.start("xenstored")
    _follow(w, kind, run, ctx)
    if target == "xenstored":
        _device_models_lose_xenstore(w)
    if target == "hypervisor":
        w.lose_domains()
    for domid in killed:
        if domid in w.domains:
            w.domains[domid].dm_alive = False


def _follow(w: Walk, kind: str, run: Run, ctx: Any) -> None:
    if kind == "create" and run.rc == 0:
        w.add(int(run.out["domid"]), ctx)
    elif kind == "restore" and run.rc == 0:
        image: Image = ctx
        intact = (image.dom.mode, image.dom.vga) not in CORRUPTS and image.dom.dm_alive
        dom = replace(image.dom, paused=False, dm_alive=True, fb=image.dom.fb if intact else None)
        w.add(int(run.out["domid"]), dom)
    elif kind == "save":
        domid, path, checkpoint = ctx
        _saved(w, domid, path, bool(checkpoint), run)


STEPS: Final[dict[str, tuple[int, Callable[[Walk], None]]]] = {
    "create": (6, create),
    "draw": (5, draw),
    "read_back": (3, read_back),
    "xenstore": (4, xenstore),
    "pause": (3, pause),
    "save": (4, save),
    "restore": (4, restore),
    "destroy": (2, destroy),
    "qmp": (2, qmp),
    "second_daemon": (1, second_daemon),
    "kill": (1, kill),
    "kill_during": (2, kill_during),
}

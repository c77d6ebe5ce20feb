"""The toolstack's side of the hostile audit: the victim guests it creates and draws, and what
it reads back through its own privileged connections."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from hypervisor_sim.client import HypervisorClient
from hypervisor_sim.protocol import HypercallError
from xenstored_sim.client import XsClient
from xenstored_sim.wire import XsError

from ...demo import BAR_ADDR, BPP, GUEST_MEMORY_MIB, HEIGHT, WIDTH, DemoRun
from .script import DEVICE, SECRET_GPA, SECRET_SEEDS, SEEDS, secret_node


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

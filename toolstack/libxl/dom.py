"""Domain building as ``libxl_dom.c`` does it: memory limits, populating and mapping guest
frames, and ``libxl__build_post``'s store keys and INTRODUCE."""

from __future__ import annotations

from typing import Final

from xenstored_sim.client import Transaction
from xenstored_sim.wire import XsError

from ..config import DomainConfig
from ..memory_stream import PAGE_SHIFT, PAGE_SIZE
from ..session import Session, ToolstackError

#: libxl's LIBXL_MAXMEM_CONSTANT: 1 MiB of slack on top of RAM and video memory.
MAXMEM_SLACK_PAGES: Final = 1024 * 1024 // PAGE_SIZE
#: The HVM xenstore ring's special page and event channel handed to INTRODUCE.
STORE_GFN: Final = 0xFEFFE
STORE_PORT: Final = 1
#: gfns per populate/map call, well inside hypervisor-sim's frame limit.
GFN_CHUNK: Final = 1 << 18


def expand(runs: list[list[int]]) -> list[int]:
    return [gfn for first, count in runs for gfn in range(first, first + count)]


class DomainBuilder(Session):
    """Building blocks of a domain (libxl_dom.c), shared by create and restore."""

    @staticmethod
    def max_pages(config: DomainConfig) -> int:
        """RAM plus video memory plus libxl's slack (xc_domain_setmaxmem in libxl_dom.c)."""
        return ((config.memory_mib + config.video_mib) << 20 >> PAGE_SHIFT) + MAXMEM_SLACK_PAGES

    async def _populate(self, domid: int, gfns: list[int]) -> None:
        for i in range(0, len(gfns), GFN_CHUNK):
            await self.hv_call("populate_physmap", domid=domid, gfns=gfns[i : i + GFN_CHUNK])

    async def _map_foreign(self, domid: int, gfns: list[int]) -> tuple[str, list[int]]:
        mem_path = ""
        offsets: list[int] = []
        for i in range(0, len(gfns), GFN_CHUNK):
            chunk = gfns[i : i + GFN_CHUNK]
            fm = await self.hv_call("map_foreign", domid=domid, gfns=chunk)
            for gfn, off, err in zip(chunk, fm["offsets"], fm["errors"], strict=True):
                if err or off < 0:
                    raise ToolstackError(f"cannot map gfn 0x{gfn:x} of domain {domid}: {err}")
            mem_path = fm["mem_path"]
            offsets.extend(fm["offsets"])
        return mem_path, offsets

    async def _build_post(self, domid: int, config: DomainConfig) -> None:
        """``libxl__build_post`` (libxl_dom.c): memory and store keys, then INTRODUCE."""
        dom = f"/local/domain/{domid}"
        entries = {
            "memory/static-max": str(config.memory_mib * 1024),
            "memory/target": str(config.memory_mib * 1024),
            "memory/videoram": str(config.video_mib * 1024),
            "domid": str(domid),
            "store/port": str(STORE_PORT),
            "store/ring-ref": str(STORE_GFN),
        }
        # image/device-model-domid is written only by libxl__spawn_stub_dm (libxl_dm.c);
        # libxl_get_stubdom_id reads it and takes a missing node for dom0.

        async def fill(t: Transaction) -> None:
            for key, value in entries.items():
                await self.xs_call("write", f"{dom}/{key}", t.write(f"{dom}/{key}", value), tx=True)

        await self.xs.run_transaction(fill)
        try:
            await self.xs.introduce(domid, STORE_GFN, STORE_PORT)
        except XsError as exc:
            self.audit.record("xs_introduce", exc.errno_name, domid=domid)
            raise
        self.audit.record("xs_introduce", domid=domid)

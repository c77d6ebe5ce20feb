"""``xl list``, ``xl list -l`` and ``xl info`` of the simulated host.

The layouts are xl's (cf. Xen tools/xl/xl_info.c: list_domains(), list_domains_details(),
main_info()).  Domain 0 is the host this runs on: its row shows the machine's memory, CPUs
and CPU time.  A guest's Time(s) is the hypervisor's ``cpu_time``, during which a simulated
vCPU counts as running whenever its domain is unpaused.
"""

from __future__ import annotations

import os
from typing import Any, Final

from xenhost.devices import DEVICE_NAMES

from .config import DomainConfig
from .libxl import Libxl

#: The shutdown-reason and state letters of ``xl list`` in order: running, blocked, paused,
#: shutdown, crashed, dying.  A simulated domain is either running or paused.
_FLAGS: Final = "rbpscd"
_HEADER: Final = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
#: libxl's JSON names for a few enumerations (libxl_types.idl).
#: libxl_vga_interface_type names: "stdvga" is "std", the others keep their names.
_VGA_KIND: Final = {d: "std" if d == "stdvga" else d for d in DEVICE_NAMES}


def state_flags(*, running: bool = False, paused: bool = False) -> str:
    """``r-----`` or ``--p---``: a letter where the state holds, ``-`` elsewhere."""
    held = {"r": running, "p": paused}
    return "".join(c if held.get(c) else "-" for c in _FLAGS)


def _meminfo_mib(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _host_cpu_seconds() -> float:
    """CPU time the machine has spent busy, all CPUs together (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        busy = sum(int(v) for i, v in enumerate(fields[:8]) if i != 3 and i != 4)
    except (OSError, ValueError):
        return 0.0
    return busy / os.sysconf("SC_CLK_TCK")


def domain0_row() -> dict[str, Any]:
    return {
        "name": "Domain-0",
        "domid": 0,
        "mem_mib": _meminfo_mib("MemTotal"),
        "vcpus": os.cpu_count() or 1,
        "state": state_flags(running=True),
        "time_s": round(_host_cpu_seconds(), 1),
    }


async def list_rows(lx: Libxl, only: int | None = None) -> list[dict[str, Any]]:
    """The guests as ``xl list`` shows them, with what ``xl-sim list`` has always told."""
    rows: list[dict[str, Any]] = []
    for d in await lx.list_domains():
        if only is not None and d.domid != only:
            continue
        info = await lx.hv.domain_getinfo(d.domid)
        loaded = lx.load_config(d.domid)
        row = d.as_dict()
        row.update(
            mem_mib=d.tot_pages * 4 // 1024,
            vcpus=loaded[0].vcpus if loaded else 1,
            state=state_flags(running=not d.paused, paused=d.paused),
            time_s=round(int(info.get("cpu_time", 0)) / 1e9, 1),
        )
        rows.append(row)
    return rows


def render_list(rows: list[dict[str, Any]]) -> str:
    lines = [_HEADER]
    for r in rows:
        lines.append(
            f"{r['name']:<40} {r['domid']:>5} {r['mem_mib']:>5} {r['vcpus']:>5}"
            f"     {r['state']}  {r['time_s']:>8.1f}"
        )
    return "\n".join(lines)


def domain_config_json(domid: int, name: str, cfg: DomainConfig | None, uuid: str | None) -> Any:
    """One element of ``xl list -l``: the domain's libxl_domain_config as libxl's JSON
    names it, with this project's own settings under ``physmap_lab``."""
    c_info: dict[str, Any] = {"type": "hvm" if domid else "pv", "name": name}
    if uuid:
        c_info["uuid"] = uuid
    if cfg is None:
        return {"domid": domid, "config": {"c_info": c_info}}
    vnc: dict[str, Any] = {"enable": str(cfg.vnc)}
    if cfg.vnc:
        vnc.update(findunused=str(cfg.vncunused))
        if cfg.vnclisten:
            vnc["listen"] = cfg.vnclisten
        if cfg.vncdisplay is not None:
            vnc["display"] = cfg.vncdisplay
    b_info = {
        "max_vcpus": cfg.vcpus,
        "max_memkb": cfg.memory_mib * 1024,
        "target_memkb": cfg.memory_mib * 1024,
        "video_memkb": cfg.video_mib * 1024,
        "device_model_version": "qemu_xen",
        "device_model_stubdomain": str(cfg.dm_stubdom),
        "dm_restrict": str(cfg.dm_restrict),
        "type.hvm": {"vga": {"kind": _VGA_KIND[cfg.vga]}, "vnc": vnc},
    }
    return {
        "domid": domid,
        "config": {
            "c_info": c_info,
            "b_info": b_info,
            "on_poweroff": cfg.on_poweroff.replace("-", "_"),
            "on_reboot": cfg.on_reboot.replace("-", "_"),
            "on_crash": cfg.on_crash.replace("-", "_"),
            "physmap_lab": {"dm_mode": cfg.dm_mode, "toolstack": cfg.toolstack},
        },
    }


async def long_form(lx: Libxl, only: int | None = None) -> list[Any]:
    """``xl list -l``: a JSON array, one object per domain, Domain-0 first."""
    out: list[Any] = []
    if only is None or only == 0:
        out.append(domain_config_json(0, "Domain-0", None, None))
    for d in await lx.list_domains():
        if only is not None and d.domid != only:
            continue
        loaded = lx.load_config(d.domid)
        cfg, uuid = loaded if loaded else (None, None)
        out.append(domain_config_json(d.domid, d.name, cfg, uuid))
    return out


async def host_info(lx: Libxl) -> dict[str, Any]:
    """``xl info``: the host (this machine) and the simulated Xen."""
    version = await lx.hv.version()
    major, _, minor = str(version["xen"]).partition(".")
    guests = await lx.list_domains()
    total = _meminfo_mib("MemTotal")
    uname = os.uname()
    return {
        "host": uname.nodename,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
        "nr_cpus": os.cpu_count() or 1,
        "total_memory": total,
        "free_memory": max(0, total - sum(d.tot_pages * 4 // 1024 for d in guests)),
        "xen_major": int(major),
        "xen_minor": int(minor or 0),
        "xen_version": f"{version['xen']}-sim",
        "xen_caps": "hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64",
        "xen_scheduler": "credit2",
        "xen_pagesize": 4096,
        "xen_libs": version["libs"],
        "xenforeignmemory_map2": version["has_map2"],
        "nr_guests": len(guests),
        "xend_config_format": 4,
    }


def render_info(info: dict[str, Any]) -> str:
    """``name                   : value``, as xl aligns it."""
    return "\n".join(f"{k:<23}: {v}" for k, v in info.items())

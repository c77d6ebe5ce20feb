"""The device-state file of ``xen-save-devices-state``: one msgpack map.

QEMU writes its device sections in a fixed order and loads them in the same order; the order
here is the part that matters for the physmap (docs/qemu-physmap.md, 'Restore, new mode' step 6):
the PCI config comes first, so the BAR is mapped (and ``xen_add_to_physmap`` runs) before the device
registers and the post_load hooks.

Format (msgpack, ``use_bin_type=True``)::

    {"magic": "physmap-lab-devices", "version": 1,
     "device": "stdvga" | "cirrus" | "qxl", "vram_size": int,
     "sections": [
        {"name": "pci", "sbdf": 16, "config": <256 bytes>,
         "bars": [{"index", "size", "io", "addr"}...]},   # "bars" is informational
        {"name": <device>, ...device registers...}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .errors import LoadError

MAGIC: Final = "physmap-lab-devices"
VERSION: Final = 1
#: Device-state files are small; anything bigger is not one of ours.
MAX_FILE: Final = 1 << 20


@dataclass(frozen=True)
class DeviceState:
    device: str
    vram_size: int
    pci_config: bytes
    device_section: dict[str, Any]


def encode(
    device: str,
    vram_size: int,
    sbdf: int,
    config: bytes,
    bars: list[dict[str, Any]],
    section: dict[str, Any],
) -> bytes:
    doc = {
        "magic": MAGIC,
        "version": VERSION,
        "device": device,
        "vram_size": vram_size,
        "sections": [
            {"name": "pci", "sbdf": sbdf, "config": config, "bars": bars},
            {"name": device, **section},
        ],
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def decode(data: bytes) -> DeviceState:
    """Parse and check the envelope; raises :class:`LoadError` with the reason."""
    if len(data) > MAX_FILE:
        raise LoadError(f"device state is {len(data)} bytes, over the {MAX_FILE}-byte limit")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise LoadError(f"device state is not msgpack: {exc}") from None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise LoadError("not a device-state file (bad magic)")
    if doc.get("version") != VERSION:
        raise LoadError(f"unsupported device-state version {doc.get('version')!r}")
    device, vram_size, sections = doc.get("device"), doc.get("vram_size"), doc.get("sections")
    if not isinstance(device, str) or not isinstance(vram_size, int) or isinstance(vram_size, bool):
        raise LoadError("device-state header lacks device or vram_size")
    if not isinstance(sections, list) or len(sections) != 2:
        raise LoadError("device state must have exactly two sections (pci, device)")
    pci, dev = sections
    if not isinstance(pci, dict) or pci.get("name") != "pci":
        raise LoadError("first section must be 'pci'")
    config = pci.get("config")
    if not isinstance(config, bytes):
        raise LoadError("pci section lacks its config bytes")
    if not isinstance(dev, dict) or dev.get("name") != device:
        raise LoadError(f"second section must be {device!r}")
    section = {k: v for k, v in dev.items() if k != "name"}
    return DeviceState(device, vram_size, config, section)

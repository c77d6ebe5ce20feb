"""The demo's plan: its cases (a mode, a VGA device, a toolstack flavour, a QEMU), the mode the
guest sets, and what each case is expected to show."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import xenhost
from hypervisor_sim import guest_drivers

DEFAULT_MODES: Final = ("new", "compat")
DEFAULT_DEVICES: Final = xenhost.DEVICE_NAMES
DEFAULT_TOOLSTACKS: Final = ("libxl",)

#: Where the guest puts the framebuffer: above 0xbffff, so compat mode records it
#: (docs/qemu-physmap.md, 'When QEMU writes the keys'), at the address of libxl's example keys
#: (docs/qemu-physmap.md, 'The keys').
BAR_ADDR: Final = guest_drivers.DEFAULT_BAR_ADDR
#: A mode every card can show: cirrus' 9-bit CRTC offset caps the pitch at 4088 bytes
#: (QEMU ``cirrus_get_offsets``), too little for 1024 pixels of 32 bits.
WIDTH: Final = 800
HEIGHT: Final = 600
BPP: Final = 32
#: Guest RAM: small, so that saving every page stays quick.
GUEST_MEMORY_MIB: Final = 32

#: The QEMU release that merged the series; ``xl-sim --dm-qemu-version`` names others.
DEFAULT_QEMU: Final = "2.10"


@dataclass(frozen=True, slots=True)
class Case:
    mode: str
    device: str
    toolstack: str = "libxl"
    #: Start the device model with ``dm_restrict`` (docs/qemu-physmap.md, 'Restriction').
    restrict: bool = False
    #: The QEMU the device model behaves as (``qemu-model --qemu-version``); 2.10 merged the
    #: series and is the default.
    qemu: str = DEFAULT_QEMU

    @property
    def name(self) -> str:
        suffix = "-restrict" if self.restrict else ""
        if self.qemu != DEFAULT_QEMU:
            suffix += f"-qemu{self.qemu}"
        return f"demo-{self.mode}-{self.device}-{self.toolstack}{suffix}"

    @property
    def label(self) -> str:
        suffix = "+restrict" if self.restrict else ""
        if self.qemu != DEFAULT_QEMU:
            suffix += f"@qemu-{self.qemu}"
        return f"{self.mode}/{self.device}/{self.toolstack}{suffix}"

    @property
    def seed(self) -> int:
        """A pattern of its own per case, so one case's pixels cannot pass for another's."""
        return zlib.crc32(self.label.encode()) & 0x7FFFFFFF


def plan(
    modes: Sequence[str] = DEFAULT_MODES,
    devices: Sequence[str] = DEFAULT_DEVICES,
    toolstacks: Sequence[str] = DEFAULT_TOOLSTACKS,
    qemus: Sequence[str] = (DEFAULT_QEMU,),
) -> list[Case]:
    """Every combination, in the order given, without repeats."""
    cases: list[Case] = []
    for qemu in dict.fromkeys(qemus):
        for mode in dict.fromkeys(modes):
            for device in dict.fromkeys(devices):
                for toolstack in dict.fromkeys(toolstacks):
                    cases.append(Case(mode, device, toolstack, qemu=qemu))
    return cases


def expected_to_work(case: Case) -> bool:
    """Whether save/restore should bring the framebuffer back in this case.

    New mode (and ``auto``, which picks it or compat) needs nothing from the toolstack.  Compat
    mode needs a toolstack that carries the physmap keys across (docs/qemu-physmap.md, 'libxl:
    restore').  The pointer-fixup scheme cannot reach QXL's derived pointers (docs/qemu-physmap.md,
    'Why not patch the pointers').
    """
    if case.mode == "compat" and case.toolstack != "libxl":
        return False
    return not (case.mode == "pointer-fixup" and case.device == "qxl")


def pattern_sha256(device: str, seed: int) -> str:
    """The hash of the framebuffer the guest draws for ``seed`` (hypervisor_sim.guest_drivers)."""
    _gpa, length = guest_drivers.framebuffer(device, BAR_ADDR, WIDTH, HEIGHT, BPP)
    return hashlib.sha256(guest_drivers.pattern_bytes(seed, length)).hexdigest()

"""Which QEMU the device model behaves as: ``qemu-model --qemu-version 2.10|3.0|current``.

The physmap series was merged for QEMU 2.10, and that is the default.  Later releases changed
some of the code the series relies on; each difference is one predicate here, so the rest of
the device model asks a question instead of comparing version strings.  ``docs/fidelity.md``
lists the upstream functions behind each row.

======================================  =========  =========  =========
behaviour                               2.10       3.0        current
======================================  =========  =========  =========
restriction                             xen_restrict: devicemodel + foreignmemory handles,
                                        in xen_hvm_init; ENOTTY is success (2.10) /
                                        xentoolcore_restrict_all in setup_post (3.0, current)
compat build with -xen-domid-restrict   starts     refuses    refuses
``running`` written when restricted     yes        no         no
VRAM relocation                         per-page   relocate   relocate
                                        gmfn loop  _memory    _memory
remap over an entry                     unmap +    unmap +    MAP_FIXED,
                                        hint       hint       no unmap
mapcache lock counter                   uint8_t    uint8_t    aborts on
                                        wraps      wraps      overflow
unknown pointer to ram_addr             abort()    abort()    RAM_ADDR_INVALID
xen_phys_offset_to_gaddr                start      start      start +
                                        _addr      _addr      offset
======================================  =========  =========  =========
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

QemuVersionName = Literal["2.10", "3.0", "current"]
QEMU_VERSIONS: Final[tuple[QemuVersionName, ...]] = ("2.10", "3.0", "current")
DEFAULT_QEMU_VERSION: Final[QemuVersionName] = "2.10"


@dataclass(frozen=True)
class QemuVersion:
    name: QemuVersionName = DEFAULT_QEMU_VERSION

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        for name in QEMU_VERSIONS:
            if name == text:
                return cls(name)
        raise ValueError(f"unknown QEMU version {text!r} (known: {', '.join(QEMU_VERSIONS)})")

    @property
    def restrict_all(self) -> bool:
        """``xentoolcore_restrict_all`` in the accelerator's setup_post (closes xenstore);
        2.10's ``xen_restrict`` restricts only the devicemodel and foreignmemory handles."""
        return self.name != "2.10"

    @property
    def skip_state_write_when_restricted(self) -> bool:
        """The ``running`` state-node write is not registered under -xen-domid-restrict."""
        return self.name != "2.10"

    @property
    def relocate_memory(self) -> bool:
        """``xendevicemodel_relocate_memory`` rather than 2.10's per-page
        ``xc_domain_add_to_physmap(XENMAPSPACE_gmfn)`` loop."""
        return self.name != "2.10"

    @property
    def remap_map_fixed(self) -> bool:
        """``xen_remap_bucket`` maps over the old address with MAP_FIXED and no munmap."""
        return self.name == "current"

    @property
    def lock_aborts_on_overflow(self) -> bool:
        """The entry lock count aborts on overflow; before, a ``uint8_t`` wraps at 256."""
        return self.name == "current"

    @property
    def ram_addr_lookup_aborts(self) -> bool:
        """``xen_ram_addr_from_mapcache`` aborts on a pointer it never handed out."""
        return self.name != "current"

    @property
    def gaddr_keeps_offset(self) -> bool:
        """``xen_phys_offset_to_gaddr`` adds the offset inside the physmap entry."""
        return self.name == "current"

    def __str__(self) -> str:
        return self.name

"""The device-model configurations whose compromise the hostile audit measures.

Each names the mode of every guest on the host, where the attacker's device model runs and
what it keeps after init:

* ``compat-dom0``: compat mode, the device model in dom0 on the privileged xenstore socket;
* ``compat-stub``: compat mode, the device model restored into a stub domain holding the
  physmap grants it needs (the audit's derived compat set: the keys under
  ``/local/domain/0/device-model/$DOMID/physmap``), as the least-privilege audit's
  ``restore-in-stubdom`` cells, the one way compat mode works in a stub (qemu-physmap.md §5.5);
* ``new-dom0``: new mode, the device model in dom0;
* ``new-stub``: new mode in a stub domain with no grant at all;
* ``new-restrict-2.10`` and ``new-restrict-3.0``: new mode with ``dm_restrict``: QEMU 2.10's
  xen_restrict restricts the devicemodel and foreignmemory handles only, so the privileged
  xenstore connection stays open; from QEMU 3.0 on it is closed too (qemu-physmap.md §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The device model's derived compat set, as the least-privilege audit grants it.
COMPAT_GRANTS: Final = (
    "r /local/domain/0/device-model/$DOMID/physmap",
    "r /local/domain/0/device-model/$DOMID/physmap/*/name",
    "r /local/domain/0/device-model/$DOMID/physmap/*/size",
    "r /local/domain/0/device-model/$DOMID/physmap/*/start_addr",
    "w /local/domain/0/device-model/$DOMID/physmap/*/name",
    "w /local/domain/0/device-model/$DOMID/physmap/*/size",
    "w /local/domain/0/device-model/$DOMID/physmap/*/start_addr",
)


@dataclass(frozen=True, slots=True)
class HostileConfig:
    name: str
    mode: str
    stubdom: bool = False
    grants: tuple[str, ...] = ()
    restrict: bool = False
    qemu_version: str = "2.10"
    #: The attacker's guest is created in dom0 and restored into its stub (compat's only
    #: working stub path).
    restore_into_stub: bool = False

    def create_args(self) -> list[str]:
        """``xl-sim create`` options of the attacker's own guest."""
        args = ["--dm-mode", self.mode, "--dm-qemu-version", self.qemu_version]
        if self.restrict:
            args.append("--dm-restrict")
        if self.stubdom and not self.restore_into_stub:
            args += self.stub_args()
        return args

    def stub_args(self) -> list[str]:
        """``xl-sim`` options that put the device model in a stub domain with its grants."""
        args = ["--dm-stubdom", "--dm-qemu-version", self.qemu_version]
        if not self.grants:
            return [*args, "--dm-no-grants"]
        for g in self.grants:
            args += ["--dm-grant", g]
        return args

    def attacker_args(self) -> list[str]:
        """``qemu-model --hostile`` options beyond the domain and its xenstore socket."""
        args = ["--qemu-version", self.qemu_version]
        if self.restrict:
            args.append("--restrict")
        if self.stubdom:
            args.append("--stubdom")
        return args


CONFIGS: Final = (
    HostileConfig("compat-dom0", "compat"),
    HostileConfig(
        "compat-stub", "compat", stubdom=True, grants=COMPAT_GRANTS, restore_into_stub=True
    ),
    HostileConfig("new-dom0", "new"),
    HostileConfig("new-stub", "new", stubdom=True),
    HostileConfig("new-restrict-2.10", "new", restrict=True, qemu_version="2.10"),
    HostileConfig("new-restrict-3.0", "new", restrict=True, qemu_version="3.0"),
)
BY_NAME: Final = {c.name: c for c in CONFIGS}

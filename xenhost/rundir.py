"""The layout of a run directory (RUNDIR), the one place its file names are spelled.

docs/architecture.md, "Run directory", is the table this module implements: the daemons'
sockets (cf. Xen's /var/run/xenstored/socket and the privcmd device), the guests' sockets,
the guest memory files, the device models' QMP sockets and logs, the audit logs and the
principals' own sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The principals that get sockets of their own on both daemons, so that the audit tells them
#: apart without their pids (docs/architecture.md, "Principals in the audit logs").  Guests
#: are told apart by their guest sockets already.
PRINCIPALS: Final = ("toolstack", "device-model")

#: The file names inside RUNDIR and inside each ``principals/<principal>/`` directory.
XENSTORED_SOCKET: Final = "socket"
HYPERVISOR_SOCKET: Final = "hypervisor.sock"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; ``RunDir(path).qmp_socket(3)`` and so on."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def xenstored_socket(self) -> Path:
        """xenstored-sim's privileged socket."""
        return self.root / XENSTORED_SOCKET

    @property
    def hypervisor_socket(self) -> Path:
        """hypervisor-sim's hypercall socket."""
        return self.root / HYPERVISOR_SOCKET

    @property
    def domains_dir(self) -> Path:
        return self.root / "domains"

    def guest_socket(self, domid: int | str) -> Path:
        """The introduced domain's xenstore socket: every connection acts as that guest."""
        return self.domains_dir / f"{domid}.sock"

    @property
    def memory_dir(self) -> Path:
        return self.root / "mem"

    def guest_memory(self, domid: int | str) -> Path:
        """The domain's machine frames, one 4 KiB page per frame."""
        return self.memory_dir / guest_memory_name(domid)

    @property
    def qmp_dir(self) -> Path:
        return self.root / "qmp"

    def qmp_socket(self, domid: int | str) -> Path:
        """The device model's QMP socket."""
        return self.qmp_dir / f"{domid}.sock"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    def audit_log(self, name: str) -> Path:
        """``audit/<name>.jsonl``: ``xenstored``, ``hypervisor`` or ``toolstack``."""
        return self.audit_dir / f"{name}.jsonl"

    @property
    def dm_dir(self) -> Path:
        return self.root / "dm"

    def dm_log(self, domid: int | str) -> Path:
        """The device model's stdout and stderr, kept by the toolstack."""
        return self.dm_dir / f"{domid}.log"

    @property
    def principals_dir(self) -> Path:
        return self.root / "principals"

    def principal_socket(self, principal: str, daemon: str) -> Path:
        """``principals/<principal>/socket`` (``daemon`` xenstored) or ``.../hypervisor.sock``."""
        return principal_socket(self.principals_dir, principal, daemon)


def guest_memory_name(domid: int | str) -> str:
    """The name of a domain's memory file inside ``mem/``."""
    return f"dom{domid}.mem"


def principal_socket(principals: str | os.PathLike[str], principal: str, daemon: str) -> Path:
    """A principal's socket under a principals directory (``$PHYSMAP_LAB_PRINCIPALS``)."""
    name = XENSTORED_SOCKET if daemon == "xenstored" else HYPERVISOR_SOCKET
    return Path(principals) / principal / name

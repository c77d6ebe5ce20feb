"""The smallest set of xenstore permissions each principal needed, derived from the audit.

A permission is an access (``r``, ``w`` or a privileged-only op such as ``introduce``) on a
path template: the guest's domid becomes ``$DOMID`` and a physmap entry's offset ``*``, so one
set covers every domain (qemu-physmap.md §1.1 for the physmap layout).

A device model names its state node relative to its own connection's home (QEMU's
``xenstore_record_dm_state``, qemu-physmap.md §2.4), so the node lands in dom0's tree for a
dom0 device model and in the stub's own, stub-owned tree for a stub domain (§5.5).  That node is
written ``~/device-model/$DOMID/state``: the device model's own tree, wherever it runs.  Every
other path stays absolute, above all the physmap keys compat mode hard-codes under
``/local/domain/0`` (§1.1, §5.5), so a write under a dom0-owned path stays visible as one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..auditlog import PathClass, Principal, XenstoreRequest, classify_path

READ_OPS: Final = frozenset({"READ", "DIRECTORY", "GET_PERMS", "WATCH", "UNWATCH"})
WRITE_OPS: Final = frozenset({"WRITE", "MKDIR", "RM", "SET_PERMS"})
#: Transactions need no permission of their own.
FREE_OPS: Final = frozenset({"TRANSACTION_START", "TRANSACTION_END"})

_PHYSMAP_ENTRY: Final = re.compile(r"(/physmap/)[0-9a-fA-F]+")
#: The principal's own home, ``/local/domain/<domid of its connection>``, in a template.
HOME: Final = "~"


@dataclass(frozen=True, order=True, slots=True)
class Permission:
    access: str
    template: str
    #: Under ``/local/domain/0``: a dom0-owned node that a deprivileged principal cannot write
    #: without an explicit ACL.  Never true of a ``~`` template.
    dom0_owned: bool
    physmap: bool

    def __str__(self) -> str:
        return f"{self.access} {self.template}"

    @property
    def own_home(self) -> bool:
        """The template is under the principal's own home (``~``)."""
        return self.template == HOME or self.template.startswith(HOME + "/")


def template(path: str, home: int | None = None) -> str:
    """``path`` with the guest's domid as ``$DOMID`` and physmap offsets as ``*``.

    ``home`` is the domid of the device model's connection: its state node under
    ``/local/domain/<home>`` becomes ``~/device-model/$DOMID/state`` (qemu-physmap.md §2.4).
    """
    info = classify_path(path)
    if home is not None and info.kind is PathClass.DM_STATE and info.dm_domid == home:
        return f"{HOME}/device-model/$DOMID/state"
    out = path
    if info.domid is not None:
        d = str(info.domid)
        out = re.sub(rf"^/local/domain/{d}(?=/|$)", "/local/domain/$DOMID", out)
        out = re.sub(rf"/device-model/{d}(?=/|$)", "/device-model/$DOMID", out)
    return _PHYSMAP_ENTRY.sub(r"\1*", out)


def access_of(op: str) -> str | None:
    if op in FREE_OPS:
        return None
    if op in READ_OPS:
        return "r"
    if op in WRITE_OPS:
        return "w"
    return op.lower()


def needed(requests: Iterable[XenstoreRequest]) -> set[Permission]:
    """Every permission the successful requests used.  A failed request needed nothing: in
    particular libxl's lookup of the physmap keys in new mode, which finds none (ENOENT)."""
    perms: set[Permission] = set()
    for r in requests:
        access = access_of(r.op)
        if access is None or not r.ok or not r.is_request:
            continue
        home = home_of(r)
        for p in r.paths or ("",):
            info = classify_path(p)
            shown = template(p, home) if p else "(no path)"
            perms.add(
                Permission(
                    access,
                    shown,
                    not shown.startswith(HOME)
                    and (p == "/local/domain/0" or p.startswith("/local/domain/0/")),
                    info.kind is PathClass.PHYSMAP,
                )
            )
    return perms


def home_of(r: XenstoreRequest) -> int | None:
    """The domid whose tree is the requester's home, for a device model's request (on the
    privileged socket or on a stub domain's guest socket); ``None`` for anyone else."""
    if r.peer.program_principal is Principal.DEVICE_MODEL:
        return r.domid
    return None

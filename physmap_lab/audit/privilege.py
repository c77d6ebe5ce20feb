"""The smallest set of xenstore permissions each principal needed, derived from the audit.

A permission is an access (``r``, ``w`` or a privileged-only op such as ``introduce``) on a
path template: the guest's domid becomes ``$DOMID`` and a physmap entry's offset ``*``, so one
set covers every domain (qemu-physmap.md §1.1 for the physmap layout).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..auditlog import PathClass, XenstoreRequest, classify_path

READ_OPS: Final = frozenset({"READ", "DIRECTORY", "GET_PERMS", "WATCH", "UNWATCH"})
WRITE_OPS: Final = frozenset({"WRITE", "MKDIR", "RM", "SET_PERMS"})
#: Transactions need no permission of their own.
FREE_OPS: Final = frozenset({"TRANSACTION_START", "TRANSACTION_END"})

_PHYSMAP_ENTRY: Final = re.compile(r"(/physmap/)[0-9a-fA-F]+")


@dataclass(frozen=True, order=True, slots=True)
class Permission:
    access: str
    template: str
    #: Under ``/local/domain/0``: a dom0-owned node that a deprivileged principal cannot write
    #: without an explicit ACL.
    dom0_owned: bool
    physmap: bool

    def __str__(self) -> str:
        return f"{self.access} {self.template}"


def template(path: str) -> str:
    info = classify_path(path)
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
        for p in r.paths or ("",):
            info = classify_path(p)
            perms.add(
                Permission(
                    access,
                    template(p) if p else "(no path)",
                    p == "/local/domain/0" or p.startswith("/local/domain/0/"),
                    info.kind is PathClass.PHYSMAP,
                )
            )
    return perms

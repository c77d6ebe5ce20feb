"""The xenstore permissions a device-model stub domain is granted, and nothing more.

A grant is written as the audit prints a derived permission: an access letter and a path
template, ``"b /local/domain/0/device-model/$DOMID/physmap/*"``.  ``$DOMID`` stands for the guest's
domid and a ``*`` component for any one child (a physmap entry's offset, docs/qemu-physmap.md, 'The
keys'). The toolstack turns each grant into an ACL entry for the stub domain (docs/xenstore.md,
'Permissions': ``r``, ``w`` or ``b`` followed by the domid) on the node itself or, for a template
with a ``*``, on the directory above the first ``*`` and on every node that already matches: nodes
created later under that directory copy its ACL (docs/xenstore.md, 'New nodes').
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

#: What a stub device model is granted by default: nothing.  It records readiness in the
#: relative ``device-model/<domid>/state`` (QEMU's ``xenstore_record_dm_state``,
#: docs/qemu-physmap.md, 'Start-up and readiness'), which lands in the stub's own, stub-owned tree
#: (docs/qemu-physmap.md, 'Stub domains'), and in new mode it needs nothing under dom0's tree for
#: the physmap either (docs/qemu-physmap.md, 'Restriction').
DEFAULT_GRANTS: Final[tuple[str, ...]] = ()

_COMPONENT: Final = re.compile(r"^(\*|\$DOMID|[A-Za-z0-9_@-]+)$")


class GrantError(ValueError):
    """A grant is not ``ACCESS /PATH`` with an access of r, w or b."""


@dataclass(frozen=True, order=True, slots=True)
class Grant:
    #: ``r``, ``w`` or ``b`` (both).
    access: str
    template: str

    def __str__(self) -> str:
        return f"{self.access} {self.template}"

    def path(self, domid: int) -> str:
        """The template for guest ``domid``."""
        return self.template.replace("$DOMID", str(domid))


def parse_grant(text: str) -> Grant:
    """``"r /local/domain/0/device-model/$DOMID/physmap"`` → :class:`Grant`."""
    access, _, template = text.strip().partition(" ")
    template = template.strip()
    if access not in ("r", "w", "b"):
        raise GrantError(f"grant {text!r}: the access must be r, w or b")
    if not template.startswith("/") or template == "/":
        raise GrantError(f"grant {text!r}: the path must be absolute and not the root")
    for part in template[1:].split("/"):
        if not _COMPONENT.match(part):
            raise GrantError(f"grant {text!r}: {part!r} is not a node name, $DOMID or *")
    return Grant(access, template)


def split_wildcard(path: str) -> tuple[str, list[str]]:
    """The directory above the first ``*`` component and the components from there on;
    ``(path, [])`` when there is no ``*``."""
    parts = path[1:].split("/")
    if "*" not in parts:
        return path, []
    i = parts.index("*")
    return "/" + "/".join(parts[:i]), parts[i:]


def merge(letters: Iterable[str]) -> str:
    """One ACL letter for a set of accesses: read and write make ``b``."""
    got = set(letters)
    if "b" in got or {"r", "w"} <= got:
        return "b"
    if not got:
        raise ValueError("no access to merge")
    (one,) = got
    return one


def with_entry(perms: Sequence[str], domid: int, letter: str) -> list[str]:
    """``perms`` (owner entry first, docs/xenstore.md, 'Permissions') with ``domid`` given
    ``letter`` on top of what an entry of its own already gave it."""
    if not perms:
        raise ValueError("a node always has an owner entry")
    out = [perms[0]]
    letters = [letter]
    for entry in perms[1:]:
        if entry[1:].isdigit() and int(entry[1:]) == domid:
            if entry[0] != "n":
                letters.append(entry[0])
            continue
        out.append(entry)
    out.append(f"{merge(letters)}{domid}")
    return out


def matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether the components ``parts`` match ``pattern`` (``*`` is any one component)."""
    return len(pattern) == len(parts) and all(
        p in ("*", q) for p, q in zip(pattern, parts, strict=True)
    )

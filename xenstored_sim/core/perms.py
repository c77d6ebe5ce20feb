"""Permission lists (docs/xenstore.md, 'Permissions').

A list is a tuple of ``(mask, domid)`` pairs.  Entry 0 names the owner, and its letter is the
access of every domain without an entry of its own; later entries are per-domain ACL entries,
kept exactly as given (duplicates included).  Letters: ``n`` none, ``r`` read, ``w`` write,
``b`` both.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import XsErrno

PERM_NONE: Final = 0
PERM_READ: Final = 1
PERM_WRITE: Final = 2
PERM_BOTH: Final = 3
#: Only the owner (or its SET_TARGET holder, or a privileged connection) may change perms.
PERM_OWNER: Final = 4
PERM_ALL: Final = PERM_BOTH | PERM_OWNER

Perms = tuple[tuple[int, int], ...]

LETTERS: Final = "nrwb"
_MASK_OF: Final = {
    ord("n"): PERM_NONE,
    ord("r"): PERM_READ,
    ord("w"): PERM_WRITE,
    ord("b"): PERM_BOTH,
}
# xenstore_strings_to_perms parses the id with strtol(..., 0): decimal, 0x hex or 0 octal.
_ENTRY: Final = re.compile(rb"([nrwb])(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")

#: The initial list of every node of a fresh store: owned by dom0, no access for others.
DEFAULT_PERMS: Final[Perms] = ((PERM_NONE, 0),)


def parse_perms(args: list[bytes]) -> Perms:
    """Parse SET_PERMS entries such as ``[b"n0", b"r5"]``; EINVAL on a bad or empty list."""
    if not args:
        raise XsErrno("EINVAL")
    out: list[tuple[int, int]] = []
    for arg in args:
        m = _ENTRY.fullmatch(arg)
        if m is None:
            raise XsErrno("EINVAL")
        # C strtol(s, NULL, 0): 0x is hex, a leading 0 octal, else decimal (docs/xenstore.md,
        # 'Permissions').
        digits = m.group(2)
        if digits[:2] in (b"0x", b"0X"):
            domid = int(digits[2:], 16)
        elif digits[:1] == b"0" and len(digits) > 1:
            domid = int(digits[1:], 8)
        else:
            domid = int(digits)
        if domid > 0xFFFFFFFF:
            raise XsErrno("EINVAL")
        out.append((_MASK_OF[arg[0]], domid))
    return tuple(out)


def format_perms(perms: Perms) -> bytes:
    """GET_PERMS reply: each entry NUL-terminated (``n0\\0r5\\0``)."""
    return b"".join(f"{LETTERS[mask]}{domid}".encode() + b"\0" for mask, domid in perms)


def entry_string(mask: int, domid: int) -> str:
    return f"{LETTERS[mask]}{domid}"

"""Permission lists (xenstore-facts.md §3).

A list is a tuple of ``(mask, domid)`` pairs.  Entry 0 names the owner, and its letter is the
access of every domain without an entry of its own; later entries are per-domain ACL entries,
kept exactly as given (duplicates included).  Letters: ``n`` none, ``r`` read, ``w`` write,
``b`` both.
"""

from __future__ import annotations

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
#: Set on an ACL entry whose domain does not exist (C ``XS_PERM_IGNORE``, XSA-322): the entry
#: is kept and listed by GET_PERMS, but grants nothing.
PERM_IGNORE: Final = 0x10
_SPACE: Final = b" \t\n\v\f\r"
_LONG_MAX: Final = (1 << 63) - 1

#: The initial list of every node of a fresh store: owned by dom0, no access for others.
DEFAULT_PERMS: Final[Perms] = ((PERM_NONE, 0),)


def c_strtol(raw: bytes) -> tuple[int, int]:
    """glibc ``strtol(s, &end, 0)``: the value (clamped to a long) and how many bytes it used
    (0 when there are no digits)."""
    i = len(raw) - len(raw.lstrip(_SPACE))
    sign = 1
    if raw[i : i + 1] in (b"+", b"-"):
        sign = -1 if raw[i : i + 1] == b"-" else 1
        i += 1
    base, digits = 10, b"0123456789"
    if raw[i : i + 2].lower() == b"0x" and raw[i + 2 : i + 3].lower() in tuple(
        bytes([c]) for c in b"0123456789abcdef"
    ):
        base, digits, i = 16, b"0123456789abcdef", i + 2
    elif raw[i : i + 1] == b"0":
        base, digits = 8, b"01234567"
    j = i
    while j < len(raw) and raw[j : j + 1].lower() in tuple(bytes([c]) for c in digits):
        j += 1
    if j == i:
        return 0, 0
    value = sign * int(raw[i:j], base)
    return max(-_LONG_MAX - 1, min(_LONG_MAX, value)), j


def parse_perms(args: list[bytes]) -> Perms:
    """Parse SET_PERMS entries such as ``[b"n0", b"r5"]`` as C ``xs_strings_to_perms()``:
    a letter, then ``strtol(..., 0)`` up to the end of the string (blanks and a sign allowed,
    the id truncated to 32 bits); EINVAL on a bad or empty list."""
    if not args:
        raise XsErrno("EINVAL")
    out: list[tuple[int, int]] = []
    for arg in args:
        mask = _MASK_OF.get(arg[0]) if arg else None
        if mask is None:
            raise XsErrno("EINVAL")
        value, used = c_strtol(arg[1:])
        if used == 0 or used != len(arg) - 1:
            raise XsErrno("EINVAL")
        out.append((mask, value & 0xFFFFFFFF))
    return tuple(out)


def format_perms(perms: Perms) -> bytes:
    """GET_PERMS reply: each entry NUL-terminated (``n0\\0r5\\0``)."""
    # C xs_perm_to_string(): the id printed as a signed int, an ignored entry as any other.
    return b"".join(entry_string(mask, domid).encode() + b"\0" for mask, domid in perms)


def entry_string(mask: int, domid: int) -> str:
    return f"{LETTERS[mask & PERM_BOTH]}{domid - (1 << 32) if domid >= 1 << 31 else domid}"

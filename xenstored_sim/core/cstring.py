"""C string helpers of the request path: argument splitting as C xenstored does it.

cf. tools/xenstored/core.c: onearg(), get_strings(); the C library's atoi().
"""

from __future__ import annotations

import re
from typing import Final

from .errors import XsErrno

_ATOI: Final = re.compile(rb"\s*([+-]?[0-9]+)")
_ERRNO_PAYLOAD: dict[str, bytes] = {}


def errno_payload(errno: str) -> bytes:
    """The payload of an ERROR reply: the errno name, NUL-terminated (cached)."""
    payload = _ERRNO_PAYLOAD.get(errno)
    if payload is None:
        payload = _ERRNO_PAYLOAD[errno] = errno.encode() + b"\0"
    return payload


def onearg(payload: bytes) -> bytes:
    """C ``onearg``: exactly one NUL, and it ends the payload; else EINVAL (docs/xenstore.md, 'Payloads')."""
    n = len(payload)
    if n == 0 or payload[-1] != 0 or payload.find(b"\0") != n - 1:
        raise XsErrno("EINVAL")
    return payload[:-1]


def c_strings(payload: bytes) -> list[bytes]:
    """C get_strings(): the NUL-terminated strings; an unterminated tail does not count."""
    return payload.split(b"\0")[: payload.count(b"\0")]


def c_args(payload: bytes, least: int) -> list[bytes]:
    """C get_strings() into a handler that needs at least ``least`` strings, else EINVAL."""
    args = c_strings(payload)
    if len(args) < least:
        raise XsErrno("EINVAL")
    return args


def two_strings(payload: bytes) -> tuple[bytes, bytes]:
    """Exactly two NUL-terminated strings (C do_watch(), do_unwatch()), else EINVAL."""
    args = c_strings(payload)
    if len(args) != 2:
        raise XsErrno("EINVAL")
    return args[0], args[1]


def atoi(raw: bytes) -> int:
    """C ``atoi``: leading blanks, a sign, digits; anything else stops it (0 if none)."""
    m = _ATOI.match(raw)
    return int(m.group(1)) if m else 0


def atou(raw: bytes) -> int:
    """C ``atoi`` stored into an ``unsigned int`` (domain ids, ports, offsets)."""
    return atoi(raw) & 0xFFFFFFFF

"""Node names: validation, relative paths and the path-length limit (docs/xenstore.md, 'Paths').

C xenstored 4.17 (``canonicalize``, ``is_valid_nodename`` in xenstored_core.c) accepts the
characters ``A-Z a-z 0-9 - / _ @``, refuses an empty path, ``//`` and a trailing ``/`` (except
the root), and limits the length with the ``path-max`` quota: under ``/local/domain/<domid>/``
only the part after that prefix counts.  Names starting with ``@`` are special watch names.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from .errors import XsErrno

_ABSOLUTE: Final = re.compile(rb"/(?:[A-Za-z0-9_@\-]+(?:/[A-Za-z0-9_@\-]+)*)?")
_SPECIAL: Final = re.compile(rb"@[A-Za-z0-9_@/\-]*")
_SEGMENT: Final = re.compile(rb"[A-Za-z0-9_@\-]+(?:/[A-Za-z0-9_@\-]+)*")
# sscanf("/local/domain/%5u/%n") in 4.17 is_valid_nodename: up to five digits, then a slash.
_LOCAL_PREFIX: Final = re.compile(r"/local/domain/[0-9]{1,5}/")

#: The two special names that fire (xenstore.txt).
INTRODUCE_DOMAIN: Final = "@introduceDomain"
RELEASE_DOMAIN: Final = "@releaseDomain"


def implicit_path(domid: int) -> str:
    """Where relative paths of ``domid`` resolve (``get_implicit_path``; sockets use dom0)."""
    return f"/local/domain/{domid}"


def counted_length(path: str) -> int:
    """The length the ``path-max`` quota compares (4.17 ``is_valid_nodename``)."""
    m = _LOCAL_PREFIX.match(path)
    return len(path) - m.end() if m else len(path)


# Clients use the same few paths again and again; the validation is a pure function.
@functools.lru_cache(maxsize=4096)
def canonicalize(raw: bytes, implicit: str, path_max: int, *, allow_special: bool = False) -> str:
    """Turn a request's path into an absolute node name, or raise EINVAL.

    ``implicit`` is the connection's home (``/local/domain/<domid>``); a relative path is
    appended to it.  ``@`` names are accepted only where ``allow_special`` (WATCH, UNWATCH,
    SET_PERMS, GET_PERMS; docs/xenstore.md, 'Paths').
    """
    if raw[:1] == b"@":
        if allow_special and _SPECIAL.fullmatch(raw):
            return raw.decode("ascii")
        raise XsErrno("EINVAL")
    if raw[:1] == b"/":
        if _ABSOLUTE.fullmatch(raw) is None:
            raise XsErrno("EINVAL")
        path = raw.decode("ascii")
    else:
        # An empty relative path becomes "<implicit>/": a trailing slash, so EINVAL
        # (docs/xenstore.md, 'Paths').
        if _SEGMENT.fullmatch(raw) is None:
            raise XsErrno("EINVAL")
        path = implicit + "/" + raw.decode("ascii")
    if counted_length(path) > path_max:
        raise XsErrno("EINVAL")
    return path


def parent_of(path: str) -> str:
    """``/a/b`` -> ``/a``; ``/a`` -> ``/``.  Not for the root."""
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def child_path(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name

"""Message types, error names and limits of the xenstore wire protocol.

Numbers and names follow ``xen/include/public/io/xs_wire.h`` (Xen 4.17).
"""

from __future__ import annotations

import enum
from typing import Final


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type``.  CONTROL was called DEBUG before Xen 4.15."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed in Xen 4.9: a daemon answers it with ENOSYS.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: ``xsd_errors[]``, in the order of ``xs_wire.h``.
XSD_ERRORS: Final = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

#: ``XENSTORE_PAYLOAD_MAX``: the largest payload in either direction.
PAYLOAD_MAX: Final = 4096
#: ``XENSTORE_ABS_PATH_MAX`` and ``XENSTORE_REL_PATH_MAX``.
ABS_PATH_MAX: Final = 3072
REL_PATH_MAX: Final = 2048
#: ``DOMID_SELF``: IS_DOMAIN_INTRODUCED always answers T for it.
DOMID_SELF: Final = 0x7FF0

HEADER_SIZE: Final = 16

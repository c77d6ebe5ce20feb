"""The trio xenstore client shared by the toolstack, the device model, the guest and the tests.

``async with open_xenstore(path) as xs:`` opens a connection; see :class:`XsClient`.
"""

from ..wire import XsError
from .client import (
    DEFAULT_TRANSACTION_ATTEMPTS,
    DEFAULT_WATCH_BUFFER,
    DirectoryPart,
    Transaction,
    Watch,
    XsClient,
    XsClientStatistics,
    open_xenstore,
    wrap_xenstore,
)
from .errors import WatchOverflow, XsDisconnected
from .paths import DEFAULT_RUNDIR, default_socket_path
from .replies import ReplyMatcher, UnexpectedReply
from .watches import WatchEvent, WatchTable, watch_covers

__all__ = [
    "DEFAULT_RUNDIR",
    "DEFAULT_TRANSACTION_ATTEMPTS",
    "DEFAULT_WATCH_BUFFER",
    "DirectoryPart",
    "ReplyMatcher",
    "Transaction",
    "UnexpectedReply",
    "Watch",
    "WatchEvent",
    "WatchOverflow",
    "WatchTable",
    "XsClient",
    "XsClientStatistics",
    "XsDisconnected",
    "XsError",
    "default_socket_path",
    "open_xenstore",
    "watch_covers",
    "wrap_xenstore",
]

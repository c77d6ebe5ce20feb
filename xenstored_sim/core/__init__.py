"""The daemon's pure core: store, permissions, watches, transactions, domains, quotas.

Private to ``xenstored-sim``; no I/O and no trio here.
"""

from .domains import ConnKind
from .engine import Outbox, XenstoreEngine
from .errors import XsErrno
from .quotas import Quotas

__all__ = ["ConnKind", "Outbox", "Quotas", "XenstoreEngine", "XsErrno"]

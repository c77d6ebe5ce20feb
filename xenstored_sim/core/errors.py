"""The one failure a request can have: an errno name sent back as an ERROR reply."""

from __future__ import annotations


class XsErrno(Exception):
    """A request failed with ``errno_name`` (a name from ``xsd_errors[]``, e.g. ``"ENOENT"``).

    Raised inside the engine and turned into an ERROR reply; it never leaves the engine.  The
    attribute is spelled as on every error carrying a Xen errno (``XsError``,
    ``HypercallError``): the xenstore wire carries the name, never the number.
    """

    __slots__ = ("errno_name", "fails_transaction")

    def __init__(self, errno_name: str, *, fails_transaction: bool = True) -> None:
        super().__init__(errno_name)
        self.errno_name = errno_name
        #: False where C answers the error without failing the enclosing transaction
        #: (an ENOSPC/ENOMEM/EIO otherwise makes its commit answer ENOMEM).
        self.fails_transaction = fails_transaction

"""How the device model fails: the ways QEMU itself gives up.

QEMU either exits with a message (``exit(1)`` after ``error_report``) or aborts on a failed
assertion.  The pure core raises these; the process shell turns them into the same outcome.
"""

from __future__ import annotations


class QemuExit(Exception):
    """QEMU prints ``message`` and exits with ``status`` (``exit(-1)`` is status 255)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class QemuAbort(Exception):
    """A failed ``assert``/``abort()`` inside QEMU: the process dies with SIGABRT."""


class CompatMap2Assertion(QemuAbort):
    """The compat ``xenforeignmemory_map2`` shim was given an address or flags.

    docs/qemu-physmap.md, 'XEN_COMPAT_PHYSMAP': libraries older than 4.10 have no map2, and QEMU's
    inline shim asserts ``addr == NULL && flags == 0`` before calling ``xenforeignmemory_map``.
    """


class LoadError(Exception):
    """A device-state file that cannot be loaded; nothing was applied."""

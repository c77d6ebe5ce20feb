"""The one QMP failure both sides of the control socket speak of.

A command QMP refuses gets ``{"error": {"class": ..., "desc": ...}}`` (QEMU
docs/interop/qmp-spec.rst, 'Error'); the device model raises :class:`QmpError` to send one and
the toolstack's QMP client raises the same class when it receives one.
"""

from __future__ import annotations

__all__ = ["QmpError"]


class QmpError(Exception):
    """A QMP command failed: ``desc`` and ``error_class`` (``"GenericError"``,
    ``"CommandNotFound"``, ``"DeviceNotFound"``...) as in the error reply.

    ``command`` names the command when the client side raises it; its message then reads
    ``QMP <command>: <class>: <desc>``, otherwise it is ``desc`` alone.
    """

    def __init__(
        self, desc: str, error_class: str = "GenericError", *, command: str | None = None
    ) -> None:
        self.desc = desc
        self.error_class = error_class
        self.command = command
        super().__init__(f"QMP {command}: {error_class}: {desc}" if command is not None else desc)

"""What one request carries through the handlers, and what it causes.

:class:`Request` is the per-request context (C xenstored keeps the like in the connection's
``struct buffered_data``, tools/xenstored/core.h): the audit facts the handlers learn (the
permission rule that decided, the paths, the CONTROL arguments) and a message that must
follow the reply (a new WATCH's first event).  :class:`Outbox` is every message a request
causes, in sending order.
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from ..wire import Packet


class Request:
    """The per-request context of the handlers."""

    __slots__ = ("after", "args", "path", "paths", "rule")

    def __init__(self) -> None:
        #: the permission rule that decided (audit)
        self.rule: str | None = None
        #: the path the request named (audit)
        self.path: str | None = None
        #: the paths it removed or committed (audit)
        self.paths: list[str] | None = None
        #: CONTROL's arguments (audit)
        self.args: list[str] | None = None
        #: a message queued after the reply (WATCH's first event)
        self.after: tuple[int, Packet] | None = None


@mypyc_attr(native_class=False)  # compiled classes cannot extend list
class Outbox(list[tuple[int, Packet]]):
    """Messages to send, in order, plus domain changes the I/O shell must act on."""

    __slots__ = ("closed", "introduced", "released")

    def __init__(self) -> None:
        # Tuples: empty on almost every request, so nothing is allocated for them.
        #: domids whose guest socket must be opened
        self.introduced: tuple[int, ...] = ()
        #: domids whose guest socket must be closed
        self.released: tuple[int, ...] = ()
        #: connections the engine has dropped (RELEASE of their domain); close them
        self.closed: tuple[int, ...] = ()

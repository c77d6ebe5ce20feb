"""The migration channel around the stream: xl's handshake messages and a follower that finds
where a libxl stream v2 ends while it arrives, so the receiver knows when the sender is done
without the sender closing the connection (the reports go back on the same connection).

xl runs ``xl migrate-receive`` at the far end and talks to it over the ssh pipe
(tools/xl/xl_migrate.c): the receiver sends a banner, the sender the xl header and the libxl
stream, the receiver reports the restore's result, the sender gives permission to go, and the
receiver reports once the domain runs.  The messages here are the same fixed strings, each
report followed by one status byte (0 = success).

The follower checks only framing: the xl header's optional-data length, the libxl and libxc
record headers and their lengths.  The receiver spools the bytes to a file and the full checks
of :func:`toolstack.image.read_image` run on it before anything is built.  Pure and synchronous.
"""

from __future__ import annotations

from typing import Final

from . import memory_stream, savefile, stream
from .streamio import StreamError

#: tools/xl/xl_migrate.c: ``migrate_receiver_banner`` and the reports that follow.
RECEIVER_BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
RECEIVER_REPORT: Final = b"xl migration receiver reports ready\n"
PERMISSION_TO_GO: Final = b"domain is yours, you are cleared to unpause\n"
FINAL_REPORT: Final = b"xl migration receiver final report\n"

_XL_FIXED: Final = len(savefile.MAGIC) + savefile.HEADER.size
_LIBXC_HEADERS: Final = memory_stream.IMAGE_HEADER.size + memory_stream.DOMAIN_HEADER.size


class StreamFollower:
    """Feed it at most :meth:`wants` bytes at a time; :attr:`done` once the libxl END is in.

    :meth:`take_events` hands out what has arrived whole since the last call, each as
    ``(kind, start, end)`` offsets into the stream: ``config`` (the xl header with the domain's
    configuration) and ``page_data`` (one libxc PAGE_DATA record, header included), so that a
    receiver can build the domain and load its pages while the rest still arrives."""

    def __init__(self) -> None:
        self.done = False
        self.offset = 0
        self.records: list[str] = []
        self._state = "xl"
        self._want = _XL_FIXED
        self._buf = bytearray()
        self._skip = False  # a body: counted, not kept
        self._events: list[tuple[str, int, int]] = []
        self._record = (0, 0)  # the libxc record under way: its type and start

    def take_events(self) -> list[tuple[str, int, int]]:
        events, self._events = self._events, []
        return events

    def wants(self) -> int:
        """Bytes the next step needs (0 when done)."""
        return 0 if self.done else self._want

    def feed(self, data: bytes) -> None:
        if len(data) > self.wants():
            raise StreamError("data after the END record", self.offset)
        self.offset += len(data)
        self._want -= len(data)
        if not self._skip:
            self._buf += data
        if self._want == 0:
            head, self._buf = bytes(self._buf), bytearray()
            self._step(head)

    def _expect(self, state: str, n: int, *, skip: bool = False) -> None:
        self._state, self._want, self._skip = state, n, skip
        if n == 0:
            self._step(b"")

    def _step(self, head: bytes) -> None:
        s = self._state
        if s == "xl":
            if head[: len(savefile.MAGIC)] != savefile.MAGIC:
                raise StreamError("not an xl migration stream (bad magic)", 0)
            optlen = savefile.HEADER.unpack_from(head, len(savefile.MAGIC))[3]
            if optlen > savefile.CONFIG_MAX + 4:
                raise StreamError(f"xl optional data of {optlen} bytes is implausible", 0)
            self._expect("xl-optional", optlen, skip=True)
        elif s == "xl-optional":
            self._events.append(("config", 0, self.offset))
            self._expect("libxl-header", stream.HEADER.size)
        elif s in ("libxl-header", "libxl-body"):
            self._expect("libxl-record", stream.RECORD_HEADER.size)
        elif s == "libxl-record":
            self._libxl_record(head)
        elif s == "libxc-headers":
            self._expect("libxc-record", memory_stream.RECORD_HEADER.size)
        elif s == "libxc-record":
            rtype, length = memory_stream.RECORD_HEADER.unpack(head)
            if length > memory_stream.RECORD_LENGTH_MAX:
                raise StreamError(f"libxc record of {length} bytes", self.offset - 8)
            self._record = (rtype, self.offset - memory_stream.RECORD_HEADER.size)
            if rtype == memory_stream.MemRecordType.END:
                self._expect("libxl-body", 0)
            else:
                self._expect("libxc-body", length + stream.padding(length), skip=True)
        elif s == "libxc-body":
            rtype, start = self._record
            if rtype == memory_stream.MemRecordType.PAGE_DATA:
                self._events.append(("page_data", start, self.offset))
            self._expect("libxc-record", memory_stream.RECORD_HEADER.size)

    def _libxl_record(self, head: bytes) -> None:
        rtype, length = stream.RECORD_HEADER.unpack(head)
        self.records.append(stream.record_name(rtype))
        if length > stream.RECORD_BODY_MAX:
            raise StreamError(f"libxl record of {length} bytes", self.offset - 8)
        if rtype == stream.RecordType.END:
            self.done = True
        elif rtype == stream.RecordType.LIBXC_CONTEXT:
            self._expect("libxc-headers", _LIBXC_HEADERS, skip=True)
        else:
            self._expect("libxl-body", length + stream.padding(length), skip=True)

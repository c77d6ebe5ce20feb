"""Sans-IO framing: ``struct xsd_sockmsg`` headers and payloads.

A message is a 16-byte header of four native-endian ``uint32_t`` (type, req_id, tx_id, len)
followed by ``len`` payload bytes (xs_wire.h).  The decoder never does I/O: feed it bytes with
:meth:`PacketDecoder.receive_data` and pull whole packets with :meth:`PacketDecoder.next_packet`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError
from .ops import HEADER_SIZE, PAYLOAD_MAX, Op

HEADER: Final = struct.Struct("=IIII")


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`PacketDecoder.next_packet` when no whole packet is buffered.
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Packet:
    """One message.  ``op`` is the raw type number: unknown numbers must be representable."""

    op: int
    req_id: int
    tx_id: int
    payload: bytes

    @property
    def op_name(self) -> str:
        try:
            return Op(self.op).name
        except ValueError:
            return f"OP{self.op}"

    def args(self) -> list[bytes]:
        """The NUL-terminated strings of the payload (a trailing unterminated part is kept)."""
        return split_args(self.payload)


def encode(packet: Packet) -> bytes:
    """Serialise a packet.  Refuses payloads the peer would reject (xs_wire.h PAYLOAD_MAX)."""
    n = len(packet.payload)
    if n > PAYLOAD_MAX:
        raise LocalProtocolError(f"payload of {n} bytes is over XENSTORE_PAYLOAD_MAX")
    return HEADER.pack(packet.op, packet.req_id, packet.tx_id, n) + packet.payload


def encode_unchecked(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Serialise without the size check, for fuzzers and tests of oversized frames."""
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


def split_args(payload: bytes) -> list[bytes]:
    """Split ``a\\0b\\0`` into ``[a, b]``; a final part without a NUL is kept as is."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def join_args(*parts: bytes | str) -> bytes:
    """``join_args("a", "b") == b"a\\0b\\0"``."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


class PacketDecoder:
    """Incremental decoder for a byte stream of packets.

    ``max_payload`` bounds the accepted ``len`` field: a larger one raises
    :class:`RemoteProtocolError` as soon as the header is seen, before any payload arrives.
    """

    __slots__ = ("_buf", "_eof", "_pos", "max_payload")

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self.max_payload = max_payload

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def unread(self) -> bytes:
        """The buffered bytes no packet has been returned for (a live update carries them)."""
        return bytes(self._buf[self._pos :])

    def next_packet(self) -> Packet | NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return NEED_DATA
        op, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
        if length > self.max_payload:
            raise RemoteProtocolError(f"header announces {length} payload bytes")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return NEED_DATA
        payload = bytes(buf[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
            if end > 65536:
                del buf[:end]
                self._pos = 0
        return Packet(op, req_id, tx_id, payload)

"""The RFB protocol (RFC 6143), server side, as a sans-IO codec in the manner of h11.

Feed the bytes a client sent to :meth:`RfbServer.receive_data`, take events with
:meth:`RfbServer.next_event`, and send what :meth:`RfbServer.data_to_send` and the
``*_update`` methods return.  Nothing here does I/O.

The handshake follows QEMU's ui/vnc.c (``protocol_version``, ``start_auth_vnc`` for the
security type None, ``protocol_client_init``): versions 3.3 (also 3.4 and 3.5, read as 3.3),
3.7 and 3.8; only security type None (1); the server's pixel format is QEMU's default, 32 bpp
depth 24 little-endian true colour with red at bit 16.  Pixels go out in raw encoding (0),
converted to the client's pixel format the way ``vnc_convert_pixel`` does (each channel
keeps its top bits); a size change is the DesktopSize pseudo-encoding (-223).

A client that breaks the protocol gets :class:`RfbError`; the shell logs its one-line reason
and closes the connection, as ``vnc_client_error`` does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from .console import Surface

PROTOCOL_VERSION: Final = b"RFB 003.008\n"
SECURITY_NONE: Final = 1
ENCODING_RAW: Final = 0
ENCODING_DESKTOP_SIZE: Final = -223
#: Client-to-server message types (RFC 6143 §7.5).
MSG_SET_PIXEL_FORMAT: Final = 0
MSG_SET_ENCODINGS: Final = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST: Final = 3
MSG_KEY_EVENT: Final = 4
MSG_POINTER_EVENT: Final = 5
MSG_CLIENT_CUT_TEXT: Final = 6
#: Server-to-client FramebufferUpdate.
MSG_FRAMEBUFFER_UPDATE: Final = 0
#: Longest cut text accepted (QEMU caps it too, ``protocol_client_msg``).
MAX_CUT_TEXT: Final = 1 << 20
MAX_ENCODINGS: Final = 1024
_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")


@dataclass(frozen=True, slots=True)
class PixelFormat:
    """RFC 6143 §7.4 PIXEL_FORMAT."""

    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    def problem(self) -> str | None:
        """Why a client may not use this format (``set_pixel_format`` checks), or None."""
        if self.bits_per_pixel not in (8, 16, 32):
            return f"unsupported bits-per-pixel {self.bits_per_pixel}"
        if not self.true_colour:
            return "colour-map pixel formats are not supported"
        for name, mx, shift in (
            ("red", self.red_max, self.red_shift),
            ("green", self.green_max, self.green_shift),
            ("blue", self.blue_max, self.blue_shift),
        ):
            if mx == 0 or mx & (mx + 1) or mx.bit_length() + shift > self.bits_per_pixel:
                return f"bad {name} max {mx} / shift {shift} for {self.bits_per_pixel} bpp"
        return None


SERVER_FORMAT: Final = PixelFormat()


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


# Events a client's messages become.


@dataclass(frozen=True, slots=True)
class ClientInit:
    shared: bool


@dataclass(frozen=True, slots=True)
class SetPixelFormat:
    format: PixelFormat


@dataclass(frozen=True, slots=True)
class SetEncodings:
    encodings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FramebufferUpdateRequest:
    incremental: bool
    rect: Rect


@dataclass(frozen=True, slots=True)
class KeyEvent:
    down: bool
    key: int


@dataclass(frozen=True, slots=True)
class PointerEvent:
    buttons: int
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class ClientCutText:
    text: bytes


Event = (
    ClientInit
    | SetPixelFormat
    | SetEncodings
    | FramebufferUpdateRequest
    | KeyEvent
    | PointerEvent
    | ClientCutText
)


class RfbError(Exception):
    """The client broke the protocol; the connection must be closed."""


class _State(Enum):
    VERSION = auto()
    SECURITY = auto()
    CLIENT_INIT = auto()
    NORMAL = auto()
    CLOSED = auto()


class RfbServer:
    """One client connection's protocol state.

    After :class:`ClientInit` the shell calls :meth:`server_init` with the current surface's
    size; from then on the messages are events.  :attr:`format` and :attr:`encodings` follow
    what the client set.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.minor = 8
        self.format = SERVER_FORMAT
        self.encodings: tuple[int, ...] = ()
        self.width = self.height = 0
        self._state = _State.VERSION
        self._buf = bytearray()
        self._out = bytearray(PROTOCOL_VERSION)

    @property
    def desktop_size(self) -> bool:
        """Whether the client takes the DesktopSize pseudo-encoding."""
        return ENCODING_DESKTOP_SIZE in self.encodings

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._state is _State.CLOSED:
            raise RfbError("data after close")
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data comes."""
        while True:
            state = self._state
            if state is _State.VERSION:
                if not self._version():
                    return None
            elif state is _State.SECURITY:
                if not self._security():
                    return None
            elif state is _State.CLIENT_INIT:
                if not self._buf:
                    return None
                shared = bool(self._take(1)[0])
                self._state = _State.NORMAL
                return ClientInit(shared)
            elif state is _State.NORMAL:
                return self._message()
            else:
                return None

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _version(self) -> bool:
        if len(self._buf) < 12:
            return False
        raw = self._take(12)
        if raw[:4] != b"RFB " or raw[7:8] != b"." or raw[11:] != b"\n":
            raise RfbError(f"bad protocol version {raw!r}")
        try:
            major, minor = int(raw[4:7]), int(raw[8:11])
        except ValueError:
            raise RfbError(f"bad protocol version {raw!r}") from None
        if major != 3 or minor not in (3, 4, 5, 7, 8):
            raise RfbError(f"unsupported protocol version {major}.{minor}")
        # 3.4 and 3.5 are UltraVNC's and treated as 3.3, as QEMU does.
        self.minor = 3 if minor in (4, 5) else minor
        if self.minor == 3:
            self._out += struct.pack(">I", SECURITY_NONE)  # the server chooses
            self._state = _State.CLIENT_INIT
        else:
            self._out += bytes((1, SECURITY_NONE))
            self._state = _State.SECURITY
        return True

    def _security(self) -> bool:
        if not self._buf:
            return False
        chosen = self._take(1)[0]
        if chosen != SECURITY_NONE:
            if self.minor >= 8:
                reason = b"Authentication failed"
                self._out += struct.pack(">II", 1, len(reason)) + reason
            self._state = _State.CLOSED
            raise RfbError(f"client chose security type {chosen}, only None (1) is offered")
        if self.minor >= 8:  # 3.7 has no SecurityResult for None
            self._out += struct.pack(">I", 0)
        self._state = _State.CLIENT_INIT
        return True

    def server_init(self, width: int, height: int) -> None:
        """ServerInit: the framebuffer size, QEMU's pixel format and the desktop name."""
        self.width, self.height = width, height
        name = self.name.encode()
        self._out += struct.pack(">HH", width, height) + SERVER_FORMAT.pack()
        self._out += struct.pack(">I", len(name)) + name

    def _message(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        kind = buf[0]
        if kind == MSG_SET_PIXEL_FORMAT:
            if len(buf) < 20:
                return None
            fmt = PixelFormat.unpack(self._take(20)[4:])
            why = fmt.problem()
            if why is not None:
                raise RfbError(f"SetPixelFormat: {why}")
            self.format = fmt
            return SetPixelFormat(fmt)
        if kind == MSG_SET_ENCODINGS:
            if len(buf) < 4:
                return None
            (n,) = struct.unpack_from(">H", buf, 2)
            if n > MAX_ENCODINGS:
                raise RfbError(f"SetEncodings: {n} encodings is too many")
            if len(buf) < 4 + 4 * n:
                return None
            self.encodings = struct.unpack(f">{n}i", self._take(4 + 4 * n)[4:])
            return SetEncodings(self.encodings)
        if kind == MSG_FRAMEBUFFER_UPDATE_REQUEST:
            if len(buf) < 10:
                return None
            _, inc, x, y, w, h = struct.unpack(">BBHHHH", self._take(10))
            return FramebufferUpdateRequest(bool(inc), Rect(x, y, w, h))
        if kind == MSG_KEY_EVENT:
            if len(buf) < 8:
                return None
            _, down, key = struct.unpack(">BB2xI", self._take(8))
            return KeyEvent(bool(down), key)
        if kind == MSG_POINTER_EVENT:
            if len(buf) < 6:
                return None
            _, mask, x, y = struct.unpack(">BBHH", self._take(6))
            return PointerEvent(mask, x, y)
        if kind == MSG_CLIENT_CUT_TEXT:
            if len(buf) < 8:
                return None
            (n,) = struct.unpack_from(">I", buf, 4)
            if n > MAX_CUT_TEXT:
                raise RfbError(f"ClientCutText: {n} bytes is too long")
            if len(buf) < 8 + n:
                return None
            return ClientCutText(self._take(8 + n)[8:])
        raise RfbError(f"unknown message type {kind}")

    # ------------------------------------------------------------------------------------
    # Server messages

    def desktop_resize(self, width: int, height: int) -> bytes:
        """A FramebufferUpdate holding only the DesktopSize pseudo-rectangle (cf.
        ``vnc_desktop_resize``); the client's framebuffer is ``width`` x ``height`` after it."""
        self.width, self.height = width, height
        return struct.pack(">BxH", MSG_FRAMEBUFFER_UPDATE, 1) + _rect_header(
            Rect(0, 0, width, height), ENCODING_DESKTOP_SIZE
        )

    def framebuffer_update(self, surface: Surface, rects: Iterable[Rect]) -> bytes:
        """One FramebufferUpdate with ``rects`` of ``surface`` in raw encoding, clipped to the
        client's framebuffer and converted to its pixel format."""
        clipped = [r for r in (clip(r, self.width, self.height) for r in rects) if r is not None]
        clipped = [
            r for r in (clip(r, surface.width, surface.height) for r in clipped) if r is not None
        ]
        parts = [struct.pack(">BxH", MSG_FRAMEBUFFER_UPDATE, len(clipped))]
        for r in clipped:
            parts.append(_rect_header(r, ENCODING_RAW))
            parts.append(convert(crop(surface, r), self.format))
        return b"".join(parts)


def _rect_header(r: Rect, encoding: int) -> bytes:
    return struct.pack(">HHHHi", r.x, r.y, r.w, r.h, encoding)


def clip(r: Rect, width: int, height: int) -> Rect | None:
    x2, y2 = min(r.x + r.w, width), min(r.y + r.h, height)
    if r.x >= x2 or r.y >= y2:
        return None
    return Rect(r.x, r.y, x2 - r.x, y2 - r.y)


def crop(surface: Surface, r: Rect) -> bytes:
    """The ``x8r8g8b8`` bytes of ``r`` (inside ``surface``), row after row."""
    stride, data = surface.stride, surface.data
    if r.x == 0 and r.w == surface.width:
        return data[r.y * stride : (r.y + r.h) * stride]
    left, width = r.x * 4, r.w * 4
    return b"".join(
        data[y * stride + left : y * stride + left + width] for y in range(r.y, r.y + r.h)
    )


def convert(xrgb: bytes, fmt: PixelFormat) -> bytes:
    """``x8r8g8b8`` little-endian pixels in the client's format (cf. ``vnc_convert_pixel``:
    each 8-bit channel keeps as many top bits as the client's max has).

    Byte-wise rather than pixel-wise: every byte of an output pixel is the OR of what each
    channel puts into it, and what a channel puts into a byte depends on that channel alone,
    so it is one 256-entry translation of the channel's bytes."""
    if fmt == SERVER_FORMAT:
        return xrgb
    size = fmt.bits_per_pixel // 8
    n = len(xrgb) // 4
    channels = (
        (xrgb[2::4], fmt.red_max, fmt.red_shift),
        (xrgb[1::4], fmt.green_max, fmt.green_shift),
        (xrgb[0::4], fmt.blue_max, fmt.blue_shift),
    )
    out = bytearray(n * size)
    for k in range(size):  # k-th least significant byte of the pixel value
        acc = 0
        for data, mx, shift in channels:
            bits = mx.bit_length()
            table = bytes(((_scale(c, bits) << shift) >> (8 * k)) & 0xFF for c in range(256))
            if any(table):
                acc |= int.from_bytes(data.translate(table), "little")
        at = size - 1 - k if fmt.big_endian else k
        out[at::size] = acc.to_bytes(n, "little")
    return bytes(out)


def _scale(channel: int, bits: int) -> int:
    """An 8-bit channel at ``bits`` bits: its top bits, or widened."""
    return channel >> (8 - bits) if bits <= 8 else channel << (bits - 8)

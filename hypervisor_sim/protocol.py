"""The hypercall protocol of ``RUNDIR/hypervisor.sock`` as a sans-IO codec.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack
(``use_bin_type=True``, ``raw=False``); frames over :data:`MAX_FRAME` are a protocol error that
closes the connection (docs/architecture.md, "Hypervisor protocol").  Requests are
``{"id", "call", "args"}``, replies carry the same id and ``"result"`` or ``"error"`` plus
``"message"``, and notifications are ``{"event": ...}`` with no id.

Nothing here does I/O: feed bytes to :class:`FrameDecoder` and pull whole payloads out, the way
h11 and wsproto separate parsing from sockets.  The daemon, the trio client and the blocking
privcmd client all share this module.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict

import msgpack

#: Frames longer than this close the connection.
MAX_FRAME: Final = 16 * 1024 * 1024
LENGTH: Final = struct.Struct(">I")

#: The errno names a reply may carry.  Xen hypercalls fail with negative errno values; the
#: names are the same as Linux's (xen/include/public/errno.h).
ERRNO_NAMES: Final = frozenset(
    {
        "EPERM",
        "ENOENT",
        "ESRCH",
        "EIO",
        "E2BIG",
        "ENOMEM",
        "EFAULT",
        "EBUSY",
        "EEXIST",
        "ENODEV",
        "EINVAL",
        "ENOSPC",
        "ENOSYS",
        "EOPNOTSUPP",
    }
)

IoreqType = Literal["pio", "copy", "pci_config"]
IoreqDir = Literal["read", "write"]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`FrameDecoder.next_payload` when no whole frame is buffered.
NEED_DATA: Final = _NeedData()


class ProtocolError(Exception):
    """The peer broke the framing; the connection must be closed."""


class MalformedMessage(Exception):
    """A whole frame arrived but is not a usable message; ``id`` is the request id if known."""

    def __init__(self, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.id = id


class HypercallError(Exception):
    """A hypercall failed: ``errno_name`` such as ``"ENOENT"`` and a human ``message``."""

    def __init__(self, errno_name: str, message: str = "", call: str | None = None) -> None:
        self.errno_name = errno_name
        self.message = message
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{errno_name}: {message}" if message else f"{where}{errno_name}")


class HypervisorDisconnected(ConnectionError):
    """The connection to hypervisor-sim is gone; every waiting call fails with this."""


# --------------------------------------------------------------------------------------------
# Framing


def pack(message: Mapping[str, Any]) -> bytes:
    """One frame: the length prefix and the msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Incremental frame splitter: :meth:`receive_data` then :meth:`next_payload` until
    :data:`NEED_DATA`."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_payload(self) -> bytes | _NeedData:
        """The next frame's body, :data:`NEED_DATA`, or :class:`ProtocolError` if oversized."""
        if len(self._buf) < LENGTH.size:
            return NEED_DATA
        (n,) = LENGTH.unpack_from(self._buf)
        if n > self._max:
            raise ProtocolError(f"frame of {n} bytes is over the {self._max}-byte limit")
        end = LENGTH.size + n
        if len(self._buf) < end:
            return NEED_DATA
        payload = bytes(self._buf[LENGTH.size : end])
        del self._buf[:end]
        return payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode one frame body into a map, or raise :class:`MalformedMessage`."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage(f"frame is not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"frame is a {type(obj).__name__}, not a map")
    if not all(isinstance(k, str) for k in obj):
        raise MalformedMessage("map keys must be strings")
    return obj


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    call: str
    args: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "call": self.call, "args": self.args}


def parse_request(obj: Mapping[str, Any]) -> Request:
    """Check the envelope of a request; the args are checked by :func:`check_args`."""
    rid = obj.get("id")
    if not _is_int(rid):
        raise MalformedMessage('request has no integer "id"')
    assert isinstance(rid, int)
    call = obj.get("call")
    if not isinstance(call, str):
        raise MalformedMessage('request has no string "call"', rid)
    args = obj.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise MalformedMessage('"args" must be a map with string keys', rid)
    return Request(rid, call, args)


def ok_reply(rid: int, result: Any) -> dict[str, Any]:
    return {"id": rid, "result": result}


def error_reply(rid: int | None, errno_name: str, message: str) -> dict[str, Any]:
    return {"id": rid, "error": errno_name, "message": message}


def ioreq_event(
    seq: int, domid: int, type: IoreqType, dir: IoreqDir, addr: int, size: int, data: int
) -> dict[str, Any]:
    """The ioreq notification pushed to a device model."""
    return {
        "event": "ioreq",
        "seq": seq,
        "domid": domid,
        "type": type,
        "dir": dir,
        "addr": addr,
        "size": size,
        "data": data,
    }


def pci_config_addr(sbdf: int, reg: int) -> int:
    """A ``pci_config`` ioreq's address: ``(sbdf << 32) | reg``, as in Xen's ioreq server."""
    return (sbdf << 32) | reg


class VersionInfo(TypedDict):
    xen: str
    libs: str
    has_map2: bool


class DomainInfo(TypedDict):
    domid: int
    name: str
    paused: bool
    tot_pages: int
    max_pages: int
    hvm: bool
    cpu_time: int


class ForeignMap(TypedDict):
    mem_path: str
    offsets: list[int]
    errors: list[str]


@dataclass(frozen=True, slots=True)
class Ioreq:
    """An ioreq notification, as a device model receives it."""

    seq: int
    domid: int
    type: IoreqType
    dir: IoreqDir
    addr: int
    size: int
    data: int

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Ioreq:
        return cls(
            seq=int(event["seq"]),
            domid=int(event["domid"]),
            type=event["type"],
            dir=event["dir"],
            addr=int(event["addr"]),
            size=int(event["size"]),
            data=int(event["data"]),
        )

    @property
    def sbdf(self) -> int:
        """For ``pci_config``: the device (segment/bus/device/function)."""
        return self.addr >> 32

    @property
    def reg(self) -> int:
        """For ``pci_config``: the config-space register offset."""
        return self.addr & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Argument schemas

# Field kinds: "int" (not bool), "str", "bool", "ints" (list of int), "list", "map", "any".
ArgSpec = dict[str, str]

CALLS: Final[dict[str, ArgSpec]] = {
    "version": {},
    "domain_create": {"name": "str", "max_pages": "int", "hvm": "bool?"},
    "domain_destroy": {"domid": "int"},
    "domain_pause": {"domid": "int"},
    "domain_unpause": {"domid": "int"},
    "domain_getinfo": {"domid": "int"},
    "domain_list": {},
    "populate_physmap": {"domid": "int", "gfns": "ints"},
    "decrease_reservation": {"domid": "int", "gfns": "ints"},
    "add_to_physmap": {"domid": "int", "space": "str", "idx": "int", "gpfn": "int"},
    "relocate_memory": {"domid": "int", "src_gfn": "int", "dst_gfn": "int", "nr": "int"},
    "pin_memory_cacheattr": {"domid": "int", "start": "int", "end": "int", "type": "int"},
    "p2m": {"domid": "int"},
    "sequence": {"calls": "list"},
    "map_foreign": {"domid": "int", "gfns": "ints"},
    "restrict": {"domid": "int"},
    "ioreq_server_create": {"domid": "int"},
    "ioreq_server_destroy": {"domid": "int", "id": "int"},
    "ioreq_complete": {"seq": "int", "data": "int?"},
    "shadow_op": {"domid": "int", "op": "str"},
    "track_dirty_vram": {"domid": "int", "first_pfn": "int", "nr": "int"},
    "modified_memory": {"domid": "int", "first_pfn": "int", "nr": "int"},
    "guest": {"domid": "int", "ops": "list"},
    "guest_driver": {"domid": "int", "device": "str", "action": "str", "params": "map?"},
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(kind: str, v: object) -> bool:
    if kind == "int":
        return _is_int(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "ints":
        return isinstance(v, list) and all(_is_int(x) for x in v)
    if kind == "list":
        return isinstance(v, list)
    if kind == "map":
        return isinstance(v, dict)
    return True


def check_args(call: str, args: Mapping[str, Any]) -> None:
    """Raise :class:`HypercallError` (``ENOSYS``/``EINVAL``) unless ``args`` fit ``call``."""
    spec = CALLS.get(call)
    if spec is None:
        # An unknown hypercall number fails with -ENOSYS on Xen.
        raise HypercallError("ENOSYS", f"unknown call {call!r}", call)
    for name, kind in spec.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if name not in args:
            if optional:
                continue
            raise HypercallError("EINVAL", f"missing argument {name!r}", call)
        if not _kind_ok(kind, args[name]):
            raise HypercallError("EINVAL", f"argument {name!r} must be {_KIND_TEXT[kind]}", call)
    extra = sorted(set(args) - set(spec))
    if extra:
        raise HypercallError("EINVAL", f"unknown argument(s) {', '.join(extra)}", call)


_KIND_TEXT: Final = {
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "ints": "a list of integers",
    "list": "a list",
    "map": "a map",
    "any": "a value",
}

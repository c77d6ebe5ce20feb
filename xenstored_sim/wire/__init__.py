"""The xenstore wire protocol as a sans-IO codec, shared by the daemon and the clients."""

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, XsError
from .framing import (
    HEADER,
    NEED_DATA,
    NeedData,
    Packet,
    PacketDecoder,
    encode,
    encode_unchecked,
    join_args,
    split_args,
)
from .ops import (
    ABS_PATH_MAX,
    DOMID_SELF,
    HEADER_SIZE,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    XSD_ERRORS,
    Op,
)

__all__ = [
    "ABS_PATH_MAX",
    "DOMID_SELF",
    "HEADER",
    "HEADER_SIZE",
    "NEED_DATA",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "XSD_ERRORS",
    "LocalProtocolError",
    "NeedData",
    "Op",
    "Packet",
    "PacketDecoder",
    "ProtocolError",
    "RemoteProtocolError",
    "XsError",
    "encode",
    "encode_unchecked",
    "join_args",
    "split_args",
]

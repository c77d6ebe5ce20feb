"""xl's own save-file header, written in front of the libxl stream (``tools/xl/xl.h``,
``xl_saverestore.c``).

``magic`` (32 octets), then four u32 in the saving host's order: ``byteorder`` (0x01020304),
``mandatory_flags`` (unknown bits refuse the restore; bit 0 = the config is JSON, bit 1 = a v2
stream follows), ``optional_flags`` (unknown bits are ignored, as ``xl`` ignores them) and
``optional_data_len``.  The
optional data is the config: its length as a u32, then the config text with a trailing NUL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Final

from .config import ConfigError, DomainConfig
from .streamio import ImageReader, StreamError

MAGIC: Final = b"Xen saved domain, xl format\n \0 \r"
BYTEORDER: Final = 0x01020304
FLAG_JSON: Final = 1 << 0
FLAG_STREAM_V2: Final = 1 << 1
_FLAGS_KNOWN: Final = FLAG_JSON | FLAG_STREAM_V2
HEADER: Final = struct.Struct("<IIII")
_LEN: Final = struct.Struct("<I")
#: A config larger than this is not a config.
CONFIG_MAX: Final = 1 << 20

assert len(MAGIC) == 32


@dataclass(frozen=True, slots=True)
class SaveFileHeader:
    mandatory_flags: int
    optional_flags: int
    config: DomainConfig | None


def write_header(f: BinaryIO, config: DomainConfig, *, pad: int = 0) -> int:
    """The header with ``config`` as JSON, as xl's ``save_domain_core_writeconfig``; ``pad``
    spaces end the JSON text (whitespace a JSON parser skips), to place what follows."""
    text = config.to_json().encode() + b" " * pad + b"\0"
    optional = _LEN.pack(len(text)) + text
    hdr = HEADER.pack(BYTEORDER, FLAG_STREAM_V2 | FLAG_JSON, 0, len(optional))
    return f.write(MAGIC + hdr + optional)


def read_header(r: ImageReader) -> SaveFileHeader:
    start = r.offset
    magic = r.read(len(MAGIC), "xl save-file header")
    if magic != MAGIC:
        raise StreamError("not an xl save file (bad magic)", start)
    byteorder, mandatory, optional_flags, optlen = HEADER.unpack(
        r.read(HEADER.size, "xl save-file header")
    )
    if byteorder != BYTEORDER:
        raise StreamError(f"save file byte order 0x{byteorder:08x} is not this host's", start)
    if mandatory & ~_FLAGS_KNOWN:
        raise StreamError(f"save file has unknown mandatory flags 0x{mandatory:x}", start)
    # Unknown optional flags are ignored (xl_saverestore.c: only mandatory ones refuse).
    if not mandatory & FLAG_STREAM_V2:
        raise StreamError("save file holds a legacy (pre-v2) stream, which is not supported", start)
    if optlen > CONFIG_MAX + _LEN.size:
        raise StreamError(f"save file optional data of {optlen} bytes is implausible", start)
    optional = r.read(optlen, "xl save-file optional data")
    config: DomainConfig | None = None
    if optlen >= _LEN.size:
        (clen,) = _LEN.unpack_from(optional)
        if clen > optlen - _LEN.size:
            raise StreamError(
                f"save file config of {clen} bytes overruns its {optlen}-byte optional data",
                start,
            )
        text = optional[_LEN.size : _LEN.size + clen]
        if clen:
            if not mandatory & FLAG_JSON:
                raise StreamError("save file config is not JSON, which is not supported", start)
            try:
                config = DomainConfig.from_json(text.rstrip(b"\0"))
            except ConfigError as exc:
                raise StreamError(f"save file config: {exc}", start) from None
    return SaveFileHeader(mandatory, optional_flags, config)

"""The ``EMULATOR_XENSTORE_DATA`` record: the device model's private xenstore keys.

On save libxl lists ``<dm root>/physmap`` and packs every entry's ``start_addr``, ``size`` and
``name`` as relative ``key\\0value\\0`` pairs after the emulator sub-header ``{emulator_id = 2
(Qemu Upstream), index = 0}``; an entry missing any of the three fails the save
(docs/qemu-physmap.md, 'libxl: save', K3).  On restore every pair is written under ``<dm root>/``
before the device model starts; an empty, absolute or unterminated key, or an unterminated value,
fails the restore (docs/qemu-physmap.md, 'libxl: restore', K5; ``libxl_dom_save.c``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .stream import EMULATOR_HEADER, EmulatorId

#: The physmap subkeys libxl requires of each entry, in the order it packs them.
PHYSMAP_FIELDS: Final = ("start_addr", "size", "name")

# The spec asks keys to be "alphanumeric ASCII and -/_@" (libxl-migration-stream.pandoc).
_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_@-]+(/[A-Za-z0-9_@-]+)*$")


class XenstoreDataError(ValueError):
    """The key/value data cannot be saved or restored; the message says which key."""


def dm_root(domid: int, dm_domid: int = 0) -> str:
    """``DEVICE_MODEL_XS_PATH(dm_domid, domid, "")`` without the trailing slash
    (``libxl_internal.h``)."""
    return f"/local/domain/{dm_domid}/device-model/{domid}"


def physmap_pairs(entries: Mapping[str, Mapping[str, str | None]]) -> list[tuple[str, str]]:
    """Pairs to save from the physmap directory: ``entries`` maps each child of
    ``<dm root>/physmap`` to its subkeys (``None`` where a read found nothing).  K3: a missing
    subkey fails the save."""
    pairs: list[tuple[str, str]] = []
    for child in entries:
        sub = entries[child]
        for name in PHYSMAP_FIELDS:
            value = sub.get(name)
            if value is None:
                raise XenstoreDataError(
                    f"physmap entry {child!r} has no {name!r} key: cannot save the device "
                    f"model's xenstore data"
                )
            pairs.append((f"physmap/{child}/{name}", value))
    return pairs


def encode(
    pairs: Sequence[tuple[str, str]],
    emulator_id: int = EmulatorId.QEMU_UPSTREAM,
    index: int = 0,
) -> bytes:
    """The record body: emulator sub-header then ``key\\0value\\0`` for each pair."""
    out = bytearray(EMULATOR_HEADER.pack(int(emulator_id), index))
    for key, value in pairs:
        check_key(key)
        if "\0" in value:
            raise XenstoreDataError(f"value of {key!r} contains a NUL")
        out += key.encode("ascii") + b"\0" + value.encode("utf-8") + b"\0"
    return bytes(out)


def check_restore_key(key: str) -> None:
    """K5, what libxl's restore checks: a non-empty, relative key (docs/qemu-physmap.md, 'libxl:
    restore').

    Nothing else: a key xenstored then refuses is a failed write that libxl ignores.
    """
    if not key:
        raise XenstoreDataError("empty key in xenstore data")
    if key.startswith("/"):
        raise XenstoreDataError(f"key {key!r} in xenstore data is not relative")


def check_key(key: str) -> None:
    """What we write on save: K5 and the spec's characters, a path of xenstore characters."""
    check_restore_key(key)
    if not _KEY_RE.match(key):
        raise XenstoreDataError(
            f"key {key!r} in xenstore data is not a path of alphanumerics and -/_@"
        )


@dataclass(frozen=True, slots=True)
class XenstoreData:
    emulator_id: int
    index: int
    pairs: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)


def decode(body: bytes) -> XenstoreData:
    """Parse a record body, applying libxl's restore checks (K5) to every pair."""
    if len(body) < EMULATOR_HEADER.size:
        raise XenstoreDataError(
            f"xenstore data of {len(body)} bytes is shorter than its emulator header"
        )
    emulator_id, index = EMULATOR_HEADER.unpack_from(body)
    data = body[EMULATOR_HEADER.size :]
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\0", pos)
        if end < 0:
            raise XenstoreDataError(f"key at byte {pos} of the xenstore data is not NUL terminated")
        # Bytes as they are: xenstored, not the restore, judges the characters.
        key = data[pos:end].decode("latin-1")
        check_restore_key(key)
        pos = end + 1
        end = data.find(b"\0", pos)
        if end < 0:
            raise XenstoreDataError(f"value of {key!r} in xenstore data is not NUL terminated")
        try:
            value = data[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise XenstoreDataError(f"value of {key!r} in xenstore data is not UTF-8") from None
        pairs.append((key, value))
        pos = end + 1
    return XenstoreData(emulator_id, index, tuple(pairs))

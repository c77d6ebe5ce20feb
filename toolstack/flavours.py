"""The toolstack flavours a domain can be saved and restored by, one object each.

A flavour says what its save writes and its restore honours in the libxl stream v2 image
(tools/libs/light/libxl_sr_stream_format.h).  ``libxl`` is libxl after the QEMU 2.10 physmap
series: ``libxl__save_emulator_xenstore_data`` (libxl_dom_save.c) writes the device model's
``physmap`` keys as an ``EMULATOR_XENSTORE_DATA`` record and
``libxl__restore_emulator_xenstore_data`` (libxl_stream_read.c) plants them again before the
device model starts.  ``unaware`` is a toolstack that predates the record: it writes none and
ignores one it finds.  Sans-IO: the libxl files and :mod:`toolstack.migrate` ask
:func:`flavour` instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class ToolstackFlavour:
    """One toolstack flavour and the stream records it carries."""

    name: str
    #: Save and migration send the device model's physmap keys (EMULATOR_XENSTORE_DATA).
    saves_emulator_xenstore_data: bool
    #: Restore writes an image's EMULATOR_XENSTORE_DATA keys under the device model's root;
    #: without it they are reported as ignored.
    restores_emulator_xenstore_data: bool


LIBXL: Final = ToolstackFlavour("libxl", True, True)
UNAWARE: Final = ToolstackFlavour("unaware", False, False)

#: Every flavour by name; ``toolstack.config.FLAVOURS`` must list the same names.
REGISTRY: Final[dict[str, ToolstackFlavour]] = {f.name: f for f in (LIBXL, UNAWARE)}


def flavour(name: str) -> ToolstackFlavour:
    """The flavour called ``name``; a :class:`ValueError` naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"toolstack must be one of {', '.join(REGISTRY)}, not {name!r}") from None

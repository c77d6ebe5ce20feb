"""EMULATOR_XENSTORE_DATA: what libxl saves (K3, K4) and what it accepts back (K5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolstack.emulator_xenstore import (
    XenstoreDataError,
    decode,
    dm_root,
    encode,
    physmap_pairs,
)

HEADER = struct.pack("<II", 2, 0)


def test_k4_record_body_is_sub_header_then_nul_terminated_pairs() -> None:
    pairs = [("physmap/1f00000/start_addr", "f0000000"), ("physmap/1f00000/size", "800000")]
    body = encode(pairs)
    assert body == HEADER + (
        b"physmap/1f00000/start_addr\0f0000000\0physmap/1f00000/size\0800000\0"
    )
    data = decode(body)
    assert (data.emulator_id, data.index) == (2, 0)
    assert list(data.pairs) == pairs


def test_k3_entries_are_saved_with_all_three_subkeys_in_libxl_order() -> None:
    entries = {"1f00000": {"size": "800000", "name": "vga.vram", "start_addr": "f0000000"}}
    assert physmap_pairs(entries) == [
        ("physmap/1f00000/start_addr", "f0000000"),
        ("physmap/1f00000/size", "800000"),
        ("physmap/1f00000/name", "vga.vram"),
    ]
    assert physmap_pairs({}) == []


@pytest.mark.parametrize("missing", ["start_addr", "size", "name"])
def test_k3_an_entry_missing_a_subkey_fails_the_save(missing: str) -> None:
    sub: dict[str, str | None] = {"start_addr": "f0000000", "size": "800000", "name": "vga.vram"}
    sub[missing] = None
    with pytest.raises(XenstoreDataError, match=f"no '{missing}' key"):
        physmap_pairs({"1f00000": sub})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\0value\0", "empty key"),
        (b"/local/domain/0/x\0v\0", "not relative"),
        (b"physmap/1/size", "not NUL terminated"),
        (b"physmap/1/size\0800000", "value of 'physmap/1/size' in xenstore data is not NUL"),
    ],
)
def test_k5_bad_keys_and_values_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(XenstoreDataError, match=message):
        decode(HEADER + payload)


@pytest.mark.parametrize("key", [b"a/../b", b"a//b", b"caf\xe9"])
def test_k5_restore_leaves_the_characters_to_xenstored(key: bytes) -> None:
    # libxl checks only empty, absolute and unterminated keys; xenstored refuses the write.
    assert decode(HEADER + key + b"\0v\0").pairs == ((key.decode("latin-1"), "v"),)


@pytest.mark.parametrize("key", ["a/../b", "a//b", ""])
def test_save_writes_only_xenstore_paths(key: str) -> None:
    with pytest.raises(XenstoreDataError):
        encode([(key, "v")])


def test_k5_keys_outside_physmap_are_accepted() -> None:
    assert decode(HEADER + b"state\0running\0").as_dict() == {"state": "running"}


def test_body_shorter_than_the_sub_header_is_rejected() -> None:
    with pytest.raises(XenstoreDataError, match="shorter than its emulator header"):
        decode(b"\2\0\0")


def test_dm_root_is_the_dom0_device_model_path() -> None:
    assert dm_root(7) == "/local/domain/0/device-model/7"
    assert dm_root(7, 3) == "/local/domain/3/device-model/7"


keys = st.lists(
    st.text("abcdefxyz0123456789_-@", min_size=1, max_size=8), min_size=1, max_size=4
).map("/".join)
values = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)


@given(st.lists(st.tuples(keys, values), max_size=10))
def test_encode_decode_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert list(decode(encode(pairs)).pairs) == pairs

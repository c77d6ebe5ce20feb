"""Permission strings are parsed as C's strtol(s, NULL, 0) does (docs/xenstore.md,
'Permissions')."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenstored_sim.core.errors import XsErrno
from xenstored_sim.core.perms import PERM_READ, entry_string, format_perms, parse_perms


@pytest.mark.parametrize(
    ("entry", "domid"),
    [
        (b"r0", 0),
        (b"r8", 8),
        (b"r9", 9),
        (b"r10", 10),
        (b"r12", 12),
        (b"r18", 18),
        (b"r32752", 32752),
        (b"r010", 8),  # a leading 0 is octal
        (b"r0x10", 16),
        # C xs_strings_to_perms() uses strtol: blanks, a sign and 32-bit truncation
        (b"r-1", 0xFFFFFFFF),
        (b"r 5", 5),
        (b"r+7", 7),
        (b"r99999999999999999999", 0xFFFFFFFF),
    ],
)
def test_domid_bases(entry: bytes, domid: int) -> None:
    assert parse_perms([entry]) == ((PERM_READ, domid),)


@pytest.mark.parametrize("entry", [b"r", b"r08", b"r0x", b"x1", b"r1a", b"r-", b"R1", b"", b"r5 "])
def test_bad_entries_are_einval(entry: bytes) -> None:
    with pytest.raises(XsErrno) as e:
        parse_perms([entry])
    assert e.value.errno_name == "EINVAL"


@given(st.lists(st.tuples(st.sampled_from(b"nrwb"), st.integers(0, 65535)), min_size=1))
def test_decimal_entries_round_trip(entries: list[tuple[int, int]]) -> None:
    raw = [bytes([letter]) + str(domid).encode() for letter, domid in entries]
    parsed = parse_perms(raw)
    assert [domid for _, domid in parsed] == [domid for _, domid in entries]
    assert format_perms(parsed) == b"".join(r + b"\0" for r in raw)


def test_ids_print_as_c_int() -> None:
    """C xs_perm_to_string() prints the id with %i: past 2**31 it is negative."""
    assert entry_string(PERM_READ, 0xFFFFFFFF) == "r-1"
    assert format_perms(parse_perms([b"n0", b"r-5"])) == b"n0\0r-5\0"

"""The stub domain's grants (toolstack.dmperms): parsing, wildcards and ACL entries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolstack.config import ConfigError, DomainConfig, parse_config
from toolstack.dmperms import (
    DEFAULT_GRANTS,
    GrantError,
    matches,
    merge,
    parse_grant,
    split_wildcard,
    with_entry,
)


def test_a_grant_reads_as_the_audit_prints_it() -> None:
    g = parse_grant("w /local/domain/0/device-model/$DOMID/physmap/*/size")
    assert (g.access, str(g)) == ("w", "w /local/domain/0/device-model/$DOMID/physmap/*/size")
    assert g.path(7) == "/local/domain/0/device-model/7/physmap/*/size"


@pytest.mark.parametrize(
    "text", ["x /a", "r", "r a/b", "r /", "r /a//b", "r /a/b c", "rw /a", "r /a/$DOM"]
)
def test_bad_grants_are_refused(text: str) -> None:
    with pytest.raises(GrantError):
        parse_grant(text)


def test_wildcards_split_at_the_first_star() -> None:
    assert split_wildcard("/a/b/*/c") == ("/a/b", ["*", "c"])
    assert split_wildcard("/a/b") == ("/a/b", [])
    assert matches(["*", "c"], ["f00", "c"]) and not matches(["*", "c"], ["f00", "d"])
    assert not matches(["*", "c"], ["f00"])


def test_entries_merge_into_one_per_domain() -> None:
    assert with_entry(["n0"], 5, "w") == ["n0", "w5"]
    assert with_entry(["n0", "r5", "r3"], 5, "w") == ["n0", "r3", "b5"]
    assert with_entry(["n0", "n5"], 5, "r") == ["n0", "r5"]
    assert merge("r") == "r" and merge("rw") == "b" and merge("wb") == "b"


@given(
    perms=st.lists(
        st.tuples(st.sampled_from("nrwb"), st.integers(0, 9)).map(lambda t: f"{t[0]}{t[1]}"),
        min_size=1,
        max_size=6,
    ),
    domid=st.integers(1, 9),
    letter=st.sampled_from("rwb"),
)
def test_with_entry_keeps_the_owner_and_only_adds_access(
    perms: list[str], domid: int, letter: str
) -> None:
    out = with_entry(perms, domid, letter)
    assert out[0] == perms[0]
    mine = [e for e in out[1:] if int(e[1:]) == domid]
    assert len(mine) == 1 and mine[0][0] in (letter, "b")
    assert [e for e in out[1:] if int(e[1:]) != domid] == [
        e for e in perms[1:] if int(e[1:]) != domid
    ]


def test_config_carries_stubdom_and_its_grants() -> None:
    cfg = parse_config("device_model_stubdomain_override = 1\n")
    assert cfg.dm_stubdom and cfg.stubdom_grants == DEFAULT_GRANTS
    # The readiness node is in the stub's own tree (docs/qemu-physmap.md, 'Start-up and readiness',
    # 'Stub domains'): nothing under dom0's tree is granted by default.
    assert DEFAULT_GRANTS == ()
    cfg = cfg.with_overrides(dm_stubdom_grants=("r  /local/domain/0/x",))
    assert cfg.stubdom_grants == ("r /local/domain/0/x",)
    assert DomainConfig.from_json(cfg.to_json()) == cfg
    assert DomainConfig.from_json(DomainConfig().to_json()).dm_stubdom is False
    with pytest.raises(ConfigError, match="access must be"):
        DomainConfig().with_overrides(dm_stubdom_grants=("q /x",))
    with pytest.raises(ConfigError, match="0 or 1"):
        parse_config("device_model_stubdomain_override = 2\n")

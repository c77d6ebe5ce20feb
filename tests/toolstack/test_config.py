"""The xl.cfg-style configuration parser and the JSON form kept in images."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolstack.config import (
    DM_MODES,
    FLAVOURS,
    VGA_CHOICES,
    ConfigError,
    DomainConfig,
    parse_config,
)


def test_full_config_parses() -> None:
    text = """
        # a guest
        name = "vm1"
        type = 'hvm'
        memory = 64 ; vga = "qxl"
        videoram = 128
        dm_mode = "compat"   # the legacy path
        dm_restrict = 1
        toolstack = "unaware"
        uuid = "6f1c1d5c-0b3e-4c9f-9a57-0f4a5c0c9e21"
    """
    cfg = parse_config(text, "vm1.cfg")
    assert cfg == DomainConfig(
        name="vm1",
        memory_mib=64,
        vga="qxl",
        videoram_mib=128,
        dm_mode="compat",
        dm_restrict=True,
        toolstack="unaware",
        uuid="6f1c1d5c-0b3e-4c9f-9a57-0f4a5c0c9e21",
    )
    assert (cfg.video_mib, cfg.vram_mib) == (128, 64)


def test_defaults_follow_libxl_video_memory() -> None:
    assert parse_config("").video_mib == 16
    assert parse_config('vga = "cirrus"').video_mib == 8
    assert parse_config('vga = "qxl"').video_mib == 128


def test_hash_inside_a_string_is_not_a_comment() -> None:
    with pytest.raises(ConfigError, match="name 'a#b'"):
        parse_config('name = "a#b" # c', "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory = 0", "x.cfg: memory must be an integer from 1"),
        ('memory = "64"', "x.cfg:1: memory must be an integer"),
        ('vga = "std"', "vga must be one of stdvga, cirrus, qxl"),
        ('dm_mode = "old"', "dm_mode must be one of new, compat, pointer-fixup, auto"),
        ("dm_restrict = 2", "x.cfg:1: dm_restrict must be 0 or 1"),
        ('toolstack = "xend"', "toolstack must be one of libxl, unaware"),
        ("colour = 1", "x.cfg:1: unknown option 'colour'"),
        ("memory 64", "x.cfg:1: expected KEY = VALUE"),
        ('name = "unterminated', "unterminated string"),
        ("memory = 64\nmemory = 32", "x.cfg:2: memory is already set on line 1"),
        ('type = "pv"', "only HVM guests"),
        (
            'vga = "cirrus"\nvideoram = 4',
            "videoram for cirrus must be a power of two from 8 to 256",
        ),
        ('vga = "qxl"\nvideoram = 192', "power of two from 128 to 512"),
        ('uuid = "nope"', "not a UUID"),
        ("name = vm", "neither a quoted string nor an integer"),
    ],
)
def test_bad_configs_give_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "x.cfg")


configs = st.builds(
    DomainConfig,
    name=st.none() | st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
    memory_mib=st.integers(1, 3840),
    vga=st.sampled_from(VGA_CHOICES),
    dm_mode=st.sampled_from(DM_MODES),
    dm_restrict=st.booleans(),
    toolstack=st.sampled_from(FLAVOURS),
)


@given(configs)
def test_json_round_trip(cfg: DomainConfig) -> None:
    assert DomainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "not an object"),
        ("{", "not JSON"),
        ('{"colour": 1}', "unknown keys: colour"),
        ('{"memory_mib": -1}', "memory must be"),
    ],
)
def test_bad_json_configs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DomainConfig.from_json(text)


def test_overrides_apply_and_are_checked() -> None:
    cfg = DomainConfig().with_overrides(vga="cirrus", memory_mib=None, dm_restrict=True)
    assert (cfg.vga, cfg.memory_mib, cfg.dm_restrict) == ("cirrus", 128, True)
    with pytest.raises(ConfigError):
        DomainConfig().with_overrides(dm_mode="bogus")

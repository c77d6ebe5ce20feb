"""The xl.cfg-style configuration parser and the JSON form kept in images."""

from __future__ import annotations

import json

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
    parse_xl_cfg,
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
        ("memory 64", "x.cfg:1: expected '=' after memory, got '64'"),
        ('name = "unterminated', "unterminated string"),
        ("memory = 64\nmemory = 32", "x.cfg:2: memory is already set on line 1"),
        ('type = "pv"', "only HVM guests"),
        (
            'vga = "cirrus"\nvideoram = 4',
            "videoram for cirrus must be a power of two from 8 to 256",
        ),
        ('vga = "qxl"\nvideoram = 192', "power of two from 128 to 512"),
        ('uuid = "nope"', "not a UUID"),
        ("name = vm", "x.cfg:1: expected a quoted string or a number, got 'vm'"),
        ("disk = [ 'a' 'b' ]", "x.cfg:1: expected ',' or ']', got \"'b'\""),
        ("vcpus = 0", "vcpus must be an integer from 1 to 128"),
        ('on_crash = "explode"', "on_crash must be one of destroy, restart"),
        ('device_model_version = "qemu-xen-traditional"', "only the qemu-xen device model"),
        ("memory = 64 64", "x.cfg:1: expected end of line or ';', got '64'"),
        ("memory = 08", "x.cfg:1: '08' is not a valid number"),
    ],
)
def test_bad_configs_give_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "x.cfg")


def test_numbers_are_read_as_c_strtol_reads_them() -> None:
    # libxlu_cfg.c: xlu_cfg_get_bounded_long() takes strtol(..., 0): a leading 0 is octal
    assert parse_config("memory = 0100").memory_mib == 64
    assert parse_config("memory = 0x40").memory_mib == 64
    assert parse_config("memory = 64").memory_mib == 64


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


FULL_XL_CFG = """
# An HVM guest as one writes it for xl (cf. Xen tools/examples/xlexample.hvm)
type = "hvm"
name = "guest"
builder = 'hvm'
memory = 256
vcpus = 2
maxvcpus = 4
kernel = "/usr/lib/xen/boot/hvmloader"
disk = [ 'phy:/dev/vg/guest,xvda,w',
         'file:/srv/cd.iso,hdc:cdrom,r', ]
vif = [ 'mac=00:16:3e:00:00:01,bridge=xenbr0' ]
on_poweroff = "destroy"; on_reboot = "restart"
on_crash = "preserve"
serial = "pty"
usb = 1
usbdevice = [ "tablet" ]
device_model_version = "qemu-xen"
vga = "qxl"
"""


def test_a_full_xl_cfg_is_accepted_and_its_unmodelled_options_are_named() -> None:
    parsed = parse_xl_cfg(FULL_XL_CFG, "guest.cfg")
    cfg = parsed.config
    assert (cfg.name, cfg.memory_mib, cfg.vcpus, cfg.vga) == ("guest", 256, 2, "qxl")
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("destroy", "restart", "preserve")
    assert [k for k, _ in parsed.ignored] == [
        "maxvcpus",
        "kernel",
        "disk",
        "vif",
        "serial",
        "usb",
        "usbdevice",
    ]
    assert dict(parsed.ignored)["vif"] == 12


def test_the_new_fields_survive_a_save_image() -> None:
    cfg = parse_config("vcpus = 3\non_crash = 'coredump-restart'")
    assert DomainConfig.from_json(cfg.to_json()) == cfg
    # An image written before these fields existed still loads, with xl's defaults.
    old = json.loads(cfg.to_json())
    for key in ("vcpus", "on_poweroff", "on_reboot", "on_crash"):
        del old[key]
    back = DomainConfig.from_json(json.dumps(old))
    assert (back.vcpus, back.on_reboot) == (1, "restart")

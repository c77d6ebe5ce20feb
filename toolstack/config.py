"""Domain configuration: an ``xl.cfg``-style parser and the JSON form kept in save images.

A whole xl.cfg(5) file is accepted (the syntax is :mod:`toolstack.xlcfg`).  The options the
simulated host models are used; every other xl.cfg(5) option is reported back as ignored, for
``xl-sim`` to warn about once, as xl warns about options its build lacks.  ``dm_mode`` and
``toolstack`` are this project's own keys; the others are named as in xl.cfg(5).
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Literal, get_args

from xenhost.devices import DISPLAY_DEVICES

from .dmperms import DEFAULT_GRANTS, GrantError, parse_grant
from .xlcfg import XL_CFG_OPTIONS, Setting, XlCfgSyntaxError, parse_settings

Vga = Literal["stdvga", "cirrus", "qxl"]
DmMode = Literal["new", "compat", "pointer-fixup", "auto"]
#: ``qemu-model --qemu-version``: the QEMU the device model behaves as (its docs/fidelity.md).
DmQemuVersion = Literal["2.10", "3.0", "current"]
Flavour = Literal["libxl", "unaware"]
#: xl.cfg(5) ``on_poweroff``, ``on_reboot``, ``on_crash``: what to do when the guest stops.
Action = Literal[
    "destroy",
    "restart",
    "rename-restart",
    "preserve",
    "coredump-destroy",
    "coredump-restart",
    "soft-reset",
]
ACTIONS: Final[tuple[str, ...]] = get_args(Action)
#: The vCPUs a domain may have (HVM_MAX_VCPUS in Xen's public/hvm/hvm_info_table.h).
MAX_VCPUS: Final = 128

VGA_CHOICES: Final[tuple[str, ...]] = get_args(Vga)
DM_MODES: Final[tuple[str, ...]] = get_args(DmMode)
DM_QEMU_VERSIONS: Final[tuple[str, ...]] = get_args(DmQemuVersion)
FLAVOURS: Final[tuple[str, ...]] = get_args(Flavour)

#: Default video memory in MiB per card, as libxl's build-info defaults for qemu-xen
#: (libxl_create.c, libxl__domain_build_info_setdefault): stdvga 16, cirrus 8, QXL 128.
VIDEORAM_DEFAULT_MIB: Final[dict[str, int]] = {
    d.name: d.videoram_default_mib for d in DISPLAY_DEVICES.values()
}

DEFAULT_MEMORY_MIB: Final = 128
#: Guest RAM stays below the 4 GiB boundary in this model, under the PCI hole at 0xf0000000.
MAX_MEMORY_MIB: Final = 0xF0000000 >> 20
#: VNC display N listens on TCP port 5900+N.
MAX_VNC_DISPLAY: Final = 65535 - 5900

# xenstore node names are alphanumeric plus "-/_@" (xenstore.txt); a name is one component.
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class ConfigError(ValueError):
    """The configuration is not usable; the message names the file, line and key."""


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """What ``xl-sim create`` builds and what a save image carries to ``restore``."""

    name: str | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB
    vga: Vga = "stdvga"
    videoram_mib: int | None = None
    dm_mode: DmMode = "new"
    dm_restrict: bool = False
    #: xl.cfg ``device_model_qemu_version``, in the manner of ``device_model_version``.
    dm_qemu_version: DmQemuVersion = "2.10"
    toolstack: Flavour = "libxl"
    uuid: str | None = None
    #: Run the device model as an unprivileged stub domain (xl.cfg
    #: ``device_model_stubdomain_override``; docs/qemu-physmap.md, 'Stub domains').
    dm_stubdom: bool = False
    #: The xenstore grants the stub domain gets (:mod:`toolstack.dmperms`); ``None``: the
    #: default set, which is empty.
    dm_stubdom_grants: tuple[str, ...] | None = None
    #: xl.cfg(5) ``vnc``, ``vnclisten``, ``vncdisplay``, ``vncunused``: the device model's
    #: VNC server (:func:`toolstack.devicemodel.vnc_arg`).  Off unless asked for, unlike xl,
    #: so that the many guests of a simulated host do not all listen.
    vnc: bool = False
    vnclisten: str | None = None
    vncdisplay: int | None = None
    vncunused: bool = True
    #: xl.cfg(5) ``vcpus``: the vCPUs the domain starts with (``xl list``'s VCPUs).
    vcpus: int = 1
    #: xl.cfg(5) ``on_poweroff``/``on_reboot``/``on_crash``, kept in the domain's configuration
    #: (``xl-sim list -l``); the simulated guest never shuts itself down or crashes.
    on_poweroff: Action = "destroy"
    on_reboot: Action = "restart"
    on_crash: Action = "destroy"

    @property
    def stubdom_grants(self) -> tuple[str, ...]:
        """The grants a stub device model gets."""
        if self.dm_stubdom_grants is None:
            return DEFAULT_GRANTS
        return self.dm_stubdom_grants

    @property
    def video_mib(self) -> int:
        """The video memory the domain is given, the card's default unless set."""
        if self.videoram_mib is not None:
            return self.videoram_mib
        return VIDEORAM_DEFAULT_MIB[self.vga]

    @property
    def vram_mib(self) -> int:
        """The size of ``vga.vram``: all the video memory, except that QXL splits it evenly
        between its RAM and VRAM BARs (``libxl_dm.c``: ``ram_size_mb``/``vram_size_mb``)."""
        return self.video_mib // 2 if self.vga == "qxl" else self.video_mib

    def with_overrides(self, **changes: Any) -> DomainConfig:
        """A copy with the non-``None`` ``changes`` applied and checked."""
        picked = {k: v for k, v in changes.items() if v is not None}
        return check(replace(self, **picked))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DomainConfig:
        """The config a save image carries; :class:`ConfigError` if it is not one."""
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"domain config is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ConfigError("domain config JSON is not an object")
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"domain config JSON has unknown keys: {', '.join(unknown)}")
        try:
            return check(cls(**obj))
        except TypeError as exc:
            raise ConfigError(f"domain config JSON: {exc}") from None


def check(config: DomainConfig) -> DomainConfig:
    """Validate every field; returns ``config`` or raises :class:`ConfigError`."""
    _check_guest(config)
    _check_device_model(config)
    config = _canonical_grants(config)
    _check_vnc(config)
    _check_build(config)
    return config


def _check_guest(config: DomainConfig) -> None:
    """The name, RAM, card and video memory."""
    if config.name is not None and (
        not isinstance(config.name, str) or not _NAME_RE.match(config.name)
    ):
        raise ConfigError(
            f"name {config.name!r} must be 1-64 characters of letters, digits and ._@-"
        )
    if not _is_int(config.memory_mib) or not 1 <= config.memory_mib <= MAX_MEMORY_MIB:
        raise ConfigError(f"memory must be an integer from 1 to {MAX_MEMORY_MIB} (MiB)")
    if config.vga not in VGA_CHOICES:
        raise ConfigError(f"vga must be one of {', '.join(VGA_CHOICES)}, not {config.vga!r}")
    if config.videoram_mib is not None:
        floor = VIDEORAM_DEFAULT_MIB[config.vga]
        # libxl refuses less video memory than the card needs (libxl_create.c).
        top = 512 if config.vga == "qxl" else 256
        if (
            not _is_int(config.videoram_mib)
            or not floor <= config.videoram_mib <= top
            or config.videoram_mib & (config.videoram_mib - 1)
        ):
            raise ConfigError(
                f"videoram for {config.vga} must be a power of two from {floor} to {top} (MiB)"
            )


def _check_device_model(config: DomainConfig) -> None:
    """The device model's mode, QEMU, restriction and stub domain."""
    if config.dm_mode not in DM_MODES:
        raise ConfigError(f"dm_mode must be one of {', '.join(DM_MODES)}, not {config.dm_mode!r}")
    if config.dm_qemu_version not in DM_QEMU_VERSIONS:
        raise ConfigError(
            f"device_model_qemu_version must be one of {', '.join(DM_QEMU_VERSIONS)}, "
            f"not {config.dm_qemu_version!r}"
        )
    if not isinstance(config.dm_restrict, bool):
        raise ConfigError("dm_restrict must be 0 or 1")
    if not isinstance(config.dm_stubdom, bool):
        raise ConfigError("device_model_stubdomain_override must be 0 or 1")


def _canonical_grants(config: DomainConfig) -> DomainConfig:
    """The stub domain's grants, each parsed and written back in its canonical form."""
    if config.dm_stubdom_grants is not None:
        grants = config.dm_stubdom_grants
        if not isinstance(grants, (list, tuple)) or not all(isinstance(g, str) for g in grants):
            raise ConfigError("the stub domain's grants must be a list of strings")
        try:
            canonical = tuple(str(parse_grant(g)) for g in grants)
        except GrantError as exc:
            raise ConfigError(str(exc)) from None
        if canonical != config.dm_stubdom_grants:
            return replace(config, dm_stubdom_grants=canonical)
    return config


def _check_build(config: DomainConfig) -> None:
    """vCPUs, the on_poweroff/on_reboot/on_crash actions, the toolstack flavour and the uuid."""
    if not _is_int(config.vcpus) or not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError(f"vcpus must be an integer from 1 to {MAX_VCPUS}")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        if getattr(config, event) not in ACTIONS:
            raise ConfigError(
                f"{event} must be one of {', '.join(ACTIONS)}, not {getattr(config, event)!r}"
            )
    if config.toolstack not in FLAVOURS:
        raise ConfigError(
            f"toolstack must be one of {', '.join(FLAVOURS)}, not {config.toolstack!r}"
        )
    if config.uuid is not None:
        try:
            uuidlib.UUID(config.uuid)
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"uuid {config.uuid!r} is not a UUID") from None


def _check_vnc(config: DomainConfig) -> None:
    for name in ("vnc", "vncunused"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be 0 or 1")
    listen = config.vnclisten
    if listen is not None and (
        not isinstance(listen, str) or not listen or "," in listen or not listen.isprintable()
    ):
        raise ConfigError(f"vnclisten {listen!r} must be an address (HOST, HOST:N or unix:PATH)")
    display = config.vncdisplay
    if display is not None and (not _is_int(display) or not 0 <= display <= MAX_VNC_DISPLAY):
        raise ConfigError(f"vncdisplay must be an integer from 0 to {MAX_VNC_DISPLAY}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# xl.cfg syntax

# key -> (field, kind)
_KEYS: Final[dict[str, tuple[str, str]]] = {
    "name": ("name", "str"),
    "memory": ("memory_mib", "int"),
    "vga": ("vga", "str"),
    "videoram": ("videoram_mib", "int"),
    "dm_mode": ("dm_mode", "str"),
    "dm_restrict": ("dm_restrict", "bool"),
    "device_model_qemu_version": ("dm_qemu_version", "str"),
    "device_model_stubdomain_override": ("dm_stubdom", "bool"),
    "toolstack": ("toolstack", "str"),
    "uuid": ("uuid", "str"),
    "vnc": ("vnc", "bool"),
    "vnclisten": ("vnclisten", "str"),
    "vncdisplay": ("vncdisplay", "int"),
    "vncunused": ("vncunused", "bool"),
    "vcpus": ("vcpus", "int"),
    "on_poweroff": ("on_poweroff", "str"),
    "on_reboot": ("on_reboot", "str"),
    "on_crash": ("on_crash", "str"),
    "type": ("", "hvm"),
    "builder": ("", "hvm"),
    "device_model_version": ("", "qemu-xen"),
}


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """A parsed xl.cfg: the configuration, and the xl.cfg(5) options it sets that the
    simulated host does not model, as ``(key, line)`` in file order."""

    config: DomainConfig
    ignored: tuple[tuple[str, int], ...]
    #: The :class:`DomainConfig` fields the file sets.
    fields: frozenset[str] = frozenset()


def _typed(setting: Setting, kind: str, where: str) -> Any:
    key, value = setting.key, setting.value
    if kind == "hvm":
        if value != "hvm":
            raise ConfigError(f"{where}: only HVM guests are simulated ({key} = 'hvm')")
        return None
    if kind == "qemu-xen":
        if value != "qemu-xen":
            raise ConfigError(f"{where}: only the qemu-xen device model is simulated")
        return None
    if kind == "int" and not _is_int(value):
        raise ConfigError(f"{where}: {key} must be an integer, not {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a quoted string, not {value!r}")
    if kind == "bool":
        if value not in (0, 1):
            raise ConfigError(f"{where}: {key} must be 0 or 1, not {value!r}")
        return bool(value)
    return value


def parse_xl_cfg(text: str, source: str = "<config>") -> ParsedConfig:
    """Parse an xl.cfg file; :class:`ConfigError` names ``source`` and the line."""
    try:
        settings = parse_settings(text, source)
    except XlCfgSyntaxError as exc:
        raise ConfigError(str(exc)) from None
    fields: dict[str, Any] = {}
    seen: dict[str, int] = {}
    ignored: list[tuple[str, int]] = []
    for setting in settings:
        key, where = setting.key, f"{source}:{setting.lineno}"
        if key in seen:
            raise ConfigError(f"{where}: {key} is already set on line {seen[key]}")
        seen[key] = setting.lineno
        if key not in _KEYS:
            if key not in XL_CFG_OPTIONS:
                raise ConfigError(f"{where}: unknown option {key!r}: not an xl.cfg(5) option")
            ignored.append((key, setting.lineno))
            continue
        field, kind = _KEYS[key]
        value = _typed(setting, kind, where)
        if field:
            fields[field] = value
    try:
        return ParsedConfig(check(DomainConfig(**fields)), tuple(ignored), frozenset(fields))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_config(text: str, source: str = "<config>") -> DomainConfig:
    """Parse an xl.cfg file, dropping the options the simulated host does not model."""
    return parse_xl_cfg(text, source).config

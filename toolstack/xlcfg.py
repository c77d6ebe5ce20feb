"""The syntax of ``xl.cfg`` files and the names of xl.cfg(5)'s options.

A file is a sequence of ``KEY = VALUE`` settings, ended by a newline or ``;``, with ``#``
comments.  A value is a quoted string (single or double quotes), an integer, or a list of
them in ``[ ... ]`` separated by commas, which may run over several lines and end with a
comma (cf. Xen tools/libs/util/libxlu_cfg_y.y and libxlu_cfg_l.l).  This module parses the
syntax only; :mod:`toolstack.config` gives the settings their meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

Atom = str | int
Value = Atom | list[Atom]


class XlCfgSyntaxError(ValueError):
    """The file is not xl.cfg syntax; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    value: Value
    lineno: int


#: Every top-level option xl.cfg(5) documents (Xen docs/man/xl.cfg.5.pod.in), so that an
#: option this model does not act on is told apart from a misspelt one.
XL_CFG_OPTIONS: Final = frozenset(
    [
        "acpi",
        "acpi_firmware",
        "acpi_laptop_slate",
        "acpi_s3",
        "acpi_s4",
        "altp2m",
        "altp2mhvm",
        "apic",
        "arm_sci",
        "bios",
        "bios_path_override",
        "boot",
        "bootloader",
        "bootloader_args",
        "bootloader_restrict",
        "bootloader_user",
        "builder",
        "channel",
        "cmdline",
        "coredump",
        "cpu_weight",
        "cpuid",
        "cpus",
        "cpus_soft",
        "device_model_args",
        "device_model_args_hvm",
        "device_model_args_pv",
        "device_model_override",
        "device_model_stubdomain_override",
        "device_model_stubdomain_seclabel",
        "device_model_user",
        "device_model_version",
        "device_tree",
        "disk",
        "dm_restrict",
        "driver_domain",
        "dtdev",
        "e820_host",
        "extra",
        "gfx_passthru",
        "gic_version",
        "hap",
        "hdtype",
        "hpet",
        "init_seclabel",
        "iomem",
        "ioports",
        "irqs",
        "kernel",
        "keymap",
        "localtime",
        "max_event_channels",
        "max_grant_frames",
        "max_grant_version",
        "max_maptrack_frames",
        "maxmem",
        "maxvcpus",
        "mca_caps",
        "memory",
        "mmio_hole",
        "ms_vm_genid",
        "msr_relaxed",
        "name",
        "nestedhvm",
        "nographic",
        "nomigrate",
        "nx",
        "on_crash",
        "on_poweroff",
        "on_reboot",
        "on_soft_reset",
        "on_watchdog",
        "p9",
        "pae",
        "passthrough",
        "pci",
        "pci_msitranslate",
        "pci_permissive",
        "pci_power_mgmt",
        "pci_seize",
        "pool",
        "pvcalls",
        "pvshim",
        "pvshim_cmdline",
        "pvshim_extra",
        "pvshim_path",
        "ramdisk",
        "rdm",
        "rdm_mem_boundary",
        "root",
        "rtc_timeoffset",
        "seclabel",
        "serial",
        "shadow_memory",
        "smbios",
        "smbios_firmware",
        "soundhw",
        "spice",
        "spice_clipboard_sharing",
        "spice_image_compression",
        "spice_streaming_video",
        "spiceagent_mouse",
        "spicedisable_ticketing",
        "spicehost",
        "spicepasswd",
        "spiceport",
        "spicetls_port",
        "spiceusbredirection",
        "spicevdagent",
        "stdvga",
        "stubdomain_cmdline",
        "stubdomain_kernel",
        "stubdomain_memory",
        "stubdomain_ramdisk",
        "timer_mode",
        "tee",
        "tsc_mode",
        "type",
        "usb",
        "usbctrl",
        "usbdev",
        "usbdevice",
        "usbversion",
        "uuid",
        "vcpus",
        "vdispl",
        "vendor_device",
        "vfb",
        "vga",
        "videoram",
        "vif",
        "viridian",
        "virtio",
        "vkb",
        "vkb_device",
        "vmtrace_buf_kb",
        "vnc",
        "vncdisplay",
        "vnclisten",
        "vncpasswd",
        "vncunused",
        "vnuma",
        "vpmu",
        "vpt_align",
        "vsnd",
        "vtpm",
        "vuart",
        "xen_platform_pci",
        "xen_platform_pci_bar_uc",
        "xend_suspend_evtchn_compat",
        "xenstore_feature_mask",
        "xenstore_quota",
        "sdl",
        "opengl",
        "display",
    ]
)

_TOKEN: Final = re.compile(
    r"""
    (?P<space>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>\n)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>0[xX][0-9a-fA-F]+|[0-9]+)
  | (?P<string>"[^"\n]*"|'[^'\n]*')
  | (?P<punct>\+=|[=\[\],;])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str
    lineno: int


def _tokens(text: str, source: str) -> list[_Tok]:
    out: list[_Tok] = []
    lineno, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos:].split("\n", 1)[0]
            what = "an unterminated string" if bad[:1] in "\"'" else repr(bad[:20])
            raise XlCfgSyntaxError(f"{source}:{lineno}: syntax error at {what}")
        kind = m.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append(_Tok(kind, m.group(), lineno))
        lineno += kind == "newline"
        pos = m.end()
    out.append(_Tok("newline", "\n", lineno))
    return out


class _Parser:
    def __init__(self, toks: list[_Tok], source: str) -> None:
        self.toks = toks
        self.i = 0
        self.source = source

    def peek(self) -> _Tok:
        return self.toks[min(self.i, len(self.toks) - 1)]

    def take(self) -> _Tok:
        tok = self.peek()
        self.i += 1
        return tok

    def fail(self, tok: _Tok, expected: str) -> XlCfgSyntaxError:
        got = "end of line" if tok.kind == "newline" else repr(tok.text)
        return XlCfgSyntaxError(f"{self.source}:{tok.lineno}: expected {expected}, got {got}")

    def skip_newlines(self) -> None:
        while self.i < len(self.toks) and self.peek().kind == "newline":
            self.i += 1

    def atom(self) -> Atom:
        tok = self.take()
        if tok.kind == "string":
            return tok.text[1:-1]
        if tok.kind == "number":
            return self.number(tok)
        raise self.fail(tok, "a quoted string or a number")

    def number(self, tok: _Tok) -> int:
        """C ``strtol(..., 0)`` (tools/libs/util/libxlu_cfg.c: xlu_cfg_get_bounded_long):
        a leading 0 is octal, and a digit 8 or 9 after it is not a valid number."""
        text = tok.text
        try:
            if len(text) > 1 and text[0] == "0" and text[1] not in "xX":
                return int(text, 8)
            return int(text, 0)
        except ValueError:
            raise XlCfgSyntaxError(
                f"{self.source}:{tok.lineno}: {text!r} is not a valid number"
            ) from None

    def value(self) -> Value:
        if self.peek().text != "[":
            return self.atom()
        self.take()
        items: list[Atom] = []
        self.skip_newlines()
        while self.peek().text != "]":
            items.append(self.atom())
            self.skip_newlines()
            if self.peek().text == ",":
                self.take()
                self.skip_newlines()
            elif self.peek().text != "]":
                raise self.fail(self.peek(), "',' or ']'")
        self.take()
        return items

    def setting(self) -> Setting:
        key = self.take()
        if key.kind != "ident":
            raise self.fail(key, "KEY = VALUE")
        op = self.take()
        if op.text == "+=":
            raise XlCfgSyntaxError(f"{self.source}:{op.lineno}: {key.text} += is not supported")
        if op.text != "=":
            raise self.fail(op, f"'=' after {key.text}")
        value = self.value()
        end = self.peek()
        if end.kind != "newline" and end.text != ";":
            raise self.fail(end, "end of line or ';'")
        self.take()
        return Setting(key.text, value, key.lineno)


def parse_settings(text: str, source: str = "<config>") -> list[Setting]:
    """The settings of an xl.cfg file in order; :class:`XlCfgSyntaxError` if it is not one."""
    p = _Parser(_tokens(text, source), source)
    out: list[Setting] = []
    while True:
        while p.i < len(p.toks) and (p.peek().kind == "newline" or p.peek().text == ";"):
            p.i += 1
        if p.i >= len(p.toks):
            return out
        out.append(p.setting())

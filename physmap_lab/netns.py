"""Two network namespaces joined by a veth pair, for two hosts whose migration stream must cross
a network.

Only loopback addresses are used (127.77.x.1 and 127.77.x.2 on the veth ends).  Linux treats
127.0.0.0/8 on an interface other than ``lo`` as martian unless ``route_localnet`` is set, and a
namespace whose ``lo`` is up routes all of 127.0.0.0/8 to itself (the ``local`` table), so the
namespaces keep ``lo`` down and set ``route_localnet`` on the veth ends: a connection from one
to the other leaves through the veth.  The hosts' daemons use Unix sockets in their run
directories, which the namespaces do not separate.  Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or no ``ip``)."""


@dataclass(frozen=True)
class Netns:
    name: str
    address: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def available() -> str | None:
    """None when namespaces can be made, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextmanager
def veth_pair(tag: str, subnet: int = 77) -> Iterator[tuple[Netns, Netns]]:
    """Make namespaces ``pml-<tag>-a`` and ``-b`` with a veth pair between them, and remove
    them (and so the pair) on the way out.  ``subnet`` picks 127.<subnet>.0.0/30."""
    why = available()
    if why is not None:
        raise NetnsUnavailable(why)
    a = Netns(f"pml-{tag}-a", f"127.{subnet}.0.1")
    b = Netns(f"pml-{tag}-b", f"127.{subnet}.0.2")
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns.name)
            made.append(ns.name)
        va, vb = f"pa{tag}"[:15], f"pb{tag}"[:15]
        _ip("link", "add", va, "netns", a.name, "type", "veth", "peer", "name", vb, "netns", b.name)
        for ns, dev in ((a, va), (b, vb)):
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/30", "dev", dev)
            for conf in ("all", dev):
                _sysctl(ns, f"net.ipv4.conf.{conf}.route_localnet=1")
            _ip("-n", ns.name, "link", "set", dev, "up")
        yield a, b
    finally:
        for name in made:
            with suppress(NetnsUnavailable):
                _ip("netns", "del", name)


def _sysctl(ns: Netns, setting: str) -> None:
    proc = subprocess.run(
        ns.wrap(["sysctl", "-qw", setting]), capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise NetnsUnavailable(f"sysctl {setting} in {ns.name}: {proc.stderr.strip()}")

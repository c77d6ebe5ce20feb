"""XS_CONTROL commands (xenstore-facts.md §8.1), answered in C 4.17's formats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .errors import XsErrno
from .quotas import QUOTA_TABLE, SOFT_QUOTA_TABLE, Quotas

if TYPE_CHECKING:
    from .engine import XenstoreEngine

OK: Final = b"OK\0"

# (command, argument synopsis) as C's "help" prints them, "name\targs".
COMMANDS: Final = (
    ("check", ""),
    ("log", "on|off"),
    ("live-update", "[-c <cmdline>] [-F] [-t <timeout>] <file>"),
    ("logfile", "<file>"),
    ("print", "<string>"),
    ("quota", "[set <name> <val>|<domid>]"),
    ("quota-soft", "[set <name> <val>]"),
    ("help", ""),
)


def help_text() -> bytes:
    return "".join(f"{name}\t{args}\n" for name, args in COMMANDS).encode() + b"\0"


def _settings(quotas: Quotas, table: tuple[tuple[str, str, str], ...]) -> bytes:
    lines = ["Quota settings:\n"]
    for name, attr, desc in table:
        lines.append(f"{name:<17}: {getattr(quotas, attr):8d} {desc}\n")
    return "".join(lines).encode() + b"\0"


def _quota(engine: XenstoreEngine, args: list[bytes], soft: bool) -> bytes:
    quotas = engine.quotas
    if not args:
        return _settings(quotas, SOFT_QUOTA_TABLE if soft else QUOTA_TABLE)
    if args[0] == b"set":
        if len(args) != 3:
            raise XsErrno("EINVAL")
        name = args[1].decode("latin-1")
        if not args[2].isdigit():
            raise XsErrno("EINVAL")
        value = int(args[2])
        if soft:
            if name != "memory" or value < 1:
                raise XsErrno("EINVAL")
            quotas.soft_memory = value
        else:
            quotas.set(name, value)
        return OK
    if soft or len(args) != 1:
        raise XsErrno("EINVAL")
    from .engine import atoi

    domid = atoi(args[0])
    if domid != 0 and domid not in engine.domains:
        raise XsErrno("ENOENT")
    usage = engine.domain_usage(domid)
    lines = [f"Domain {domid}:\n"]
    lines.extend(f"{name:<16}: {value:8d}\n" for name, value in usage.items())
    return "".join(lines).encode() + b"\0"


def run(engine: XenstoreEngine, args: list[bytes]) -> bytes:
    """Run one CONTROL command; unknown commands and bad arguments are EINVAL."""
    if not args:
        raise XsErrno("EINVAL")
    cmd, rest = args[0], args[1:]
    # C do_control_print(), do_control_check(): exactly one argument, none.
    if cmd == b"print":
        if len(rest) != 1:
            raise XsErrno("EINVAL")
        return OK
    if cmd == b"check":
        if rest:
            raise XsErrno("EINVAL")
        return OK if not engine.check() else b"ERROR\0"
    if cmd == b"log":
        if len(rest) != 1 or rest[0] not in (b"on", b"off"):
            raise XsErrno("EINVAL")
        return OK
    if cmd == b"logfile":
        if len(rest) != 1:
            raise XsErrno("EINVAL")
        return OK
    if cmd == b"quota":
        return _quota(engine, rest, soft=False)
    if cmd == b"quota-soft":
        return _quota(engine, rest, soft=True)
    if cmd == b"help":
        return help_text()
    raise XsErrno("EINVAL")

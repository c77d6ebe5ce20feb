"""Read the audit logs of a run: who asked xenstore, the hypervisor and the toolstack for what.

Three JSON Lines files live under ``RUNDIR/audit/`` (docs/architecture.md, "Run directory"):

- ``xenstored.jsonl``: one record per xenstore request and per connect/disconnect, with
  ``t``, ``conn``, ``domid``, ``priv``, ``op``, ``path`` or ``paths``, ``tx``, ``result``
  (``"OK"`` or an errno name), ``rule`` (the permission rule that decided), and the peer of the
  connection: ``pid`` and ``cmdline`` from ``SO_PEERCRED`` and ``/proc``, ``guest`` for a
  connection on a domain's guest socket, ``principal`` for one on a principal's own socket;
- ``hypervisor.jsonl``: one record per hypercall (``conn``, ``peer``, ``call``, ``domid``,
  ``result``) and per guest op (``call`` = ``"guest_op"``, ``op``, no peer);
- ``toolstack.jsonl``: what each ``xl-sim`` command did (``command``, ``action``, ``path`` or
  ``call``, ``domid``, ``result``, ``pid``).

Everything here is pure: records in, typed records and counts out.  A principal is recognised
from the peer alone, with no change to the wire protocol.  The socket decides first: the guest
talks on its guest socket (whose peer is hypervisor-sim, the process that runs the guest's vCPU
actor), and a connection on a principal's own socket (``--principal-socket``, assigned by the
launcher) is that principal's, whatever its pid says; this holds across PID namespaces, where
``SO_PEERCRED`` gives pid 0.  Otherwise the program does: the toolstack runs ``xl-sim`` (or is
``physmap-lab``), a device model runs ``qemu-model --domid N``.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final

__all__ = [
    "AuditFormatError",
    "HypercallRecord",
    "PathClass",
    "PathInfo",
    "Peer",
    "Principal",
    "ToolstackRecord",
    "XenstoreAudit",
    "XenstoreRequest",
    "classify_path",
    "classify_peer",
    "iter_jsonl",
    "parse_hypercall",
    "parse_toolstack",
    "parse_xenstored",
    "read_hypervisor",
    "read_jsonl",
    "read_toolstack",
    "read_xenstored",
]


class AuditFormatError(ValueError):
    """A line or record is not what the daemon writes; the message says where."""


class Principal(enum.StrEnum):
    TOOLSTACK = "toolstack"
    DEVICE_MODEL = "device-model"
    GUEST = "guest"
    OTHER = "other"


class PathClass(enum.StrEnum):
    #: ``/local/domain/<dm>/device-model/<domid>/physmap`` and below (qemu-physmap.md §1.1).
    PHYSMAP = "physmap"
    #: ``/local/domain/<dm>/device-model/<domid>/state``, the device model's readiness node
    #: (qemu-physmap.md §2.4).
    DM_STATE = "dm-state"
    #: The rest of ``/local/domain/<dm>/device-model/<domid>``: the directory itself and any
    #: other key the device model and the toolstack share.
    DEVICE_MODEL = "device-model"
    #: ``/local/domain/<domid>`` and below for a guest (domid other than 0).
    GUEST_TREE = "guest-tree"
    OTHER = "other"


#: Programs whose connections are the toolstack's: xl itself, and the lab's launcher.
TOOLSTACK_PROGRAMS: Final = frozenset({"xl-sim", "physmap-lab"})
TOOLSTACK_MODULES: Final = frozenset(
    {"toolstack", "toolstack.cli", "physmap_lab", "physmap_lab.cli"}
)
DEVICE_MODEL_PROGRAM: Final = "qemu-model"
DEVICE_MODEL_MODULES: Final = frozenset({"qemu_model", "qemu_model.cli"})

#: Results that mean the daemon refused the request on permission grounds (xenstore-facts.md).
DENIED_RESULTS: Final = frozenset({"EACCES", "EPERM"})
#: xenstored records a connection's arrival and departure alongside its requests.
CONNECTION_EVENTS: Final = frozenset({"connect", "disconnect"})

_DM_PATH: Final = re.compile(r"^/local/domain/(\d+)/device-model/(\d+)(?:/([^/]+)(/.*)?)?$")
_DOMAIN_PATH: Final = re.compile(r"^/local/domain/(\d+)(?:/.*)?$")
_PYTHON: Final = re.compile(r"^python(\d+(\.\d+)?)?$")


# ------------------------------------------------------------------------------- principals


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a connection."""

    pid: int | None
    cmdline: tuple[str, ...]
    #: The connection came in on a domain's guest socket.
    guest: bool = False
    #: The principal whose own socket the connection came in on (``principal`` in the record).
    assigned: str | None = None

    @property
    def principal(self) -> Principal:
        return classify_peer(self.cmdline, guest=self.guest, assigned=self.assigned)

    @property
    def program_principal(self) -> Principal:
        """The principal the process is, whatever socket it used (a stub domain's device model
        talks on its domain's guest socket)."""
        return classify_peer(self.cmdline, assigned=self.assigned)

    @property
    def program(self) -> str | None:
        """The program name: the script a Python interpreter runs, or ``-m``'s module."""
        return _program(self.cmdline)

    @property
    def dm_domid(self) -> int | None:
        """The ``--domid`` of a device model; ``None`` for anyone else."""
        if self.principal is not Principal.DEVICE_MODEL:
            return None
        return _option_int(self.cmdline, "--domid")


def _program(cmdline: Sequence[str]) -> str | None:
    args = list(cmdline)
    if not args:
        return None
    if _PYTHON.match(PurePosixPath(args[0]).name):
        rest = args[1:]
        # Interpreter options come before the script or the -m module.
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "-m":
            return rest[1]
        return PurePosixPath(rest[0]).name if rest else None
    return PurePosixPath(args[0]).name


def _option_int(cmdline: Sequence[str], option: str) -> int | None:
    for i, arg in enumerate(cmdline):
        if arg == option and i + 1 < len(cmdline):
            value = cmdline[i + 1]
        elif arg.startswith(option + "="):
            value = arg[len(option) + 1 :]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def classify_peer(
    cmdline: Sequence[str], *, guest: bool = False, assigned: str | None = None
) -> Principal:
    """The principal behind a connection.

    A guest-socket connection is the guest whatever process carries it, and one on a
    principal's own socket is that principal (``assigned``; an unknown name is ``other``).
    Otherwise the program decides: ``xl-sim`` or ``physmap-lab`` is the toolstack,
    ``qemu-model --domid N`` a device model.
    """
    if guest:
        return Principal.GUEST
    if assigned is not None:
        try:
            return Principal(assigned)
        except ValueError:
            return Principal.OTHER
    program = _program(cmdline)
    if program in TOOLSTACK_PROGRAMS or program in TOOLSTACK_MODULES:
        return Principal.TOOLSTACK
    # A device model without its --domid is not one the toolstack started.
    is_dm = program == DEVICE_MODEL_PROGRAM or program in DEVICE_MODEL_MODULES
    if is_dm and _option_int(cmdline, "--domid") is not None:
        return Principal.DEVICE_MODEL
    return Principal.OTHER


# ------------------------------------------------------------------------------------ paths


@dataclass(frozen=True, slots=True)
class PathInfo:
    kind: PathClass
    #: The guest the path is about (the ``<domid>`` of a device-model path, the domain of a
    #: guest tree); ``None`` for other paths.
    domid: int | None = None
    #: The device model's domain for device-model paths (0 unless it runs in a stub domain).
    dm_domid: int | None = None


def classify_path(path: str) -> PathInfo:
    """What a xenstore path in an audit record is about."""
    m = _DM_PATH.match(path)
    if m is not None:
        dm, domid, child, below = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if child == "physmap":
            kind = PathClass.PHYSMAP
        elif child == "state" and below is None:
            kind = PathClass.DM_STATE
        else:
            kind = PathClass.DEVICE_MODEL
        return PathInfo(kind, domid, dm)
    m = _DOMAIN_PATH.match(path)
    if m is not None and int(m.group(1)) != 0:
        return PathInfo(PathClass.GUEST_TREE, int(m.group(1)))
    return PathInfo(PathClass.OTHER)


# ------------------------------------------------------------------------------ JSON Lines


def iter_jsonl(
    lines: Iterable[str | bytes], *, source: str = "<audit>"
) -> Iterator[dict[str, Any]]:
    """Each non-blank line as a JSON object; :class:`AuditFormatError` names a bad line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AuditFormatError(f"{source}:{n}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise AuditFormatError(f"{source}:{n}: a {type(obj).__name__}, not an object")
        yield obj


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every whole record of a JSON Lines file.

    A last line without its newline is left out: a daemon that is still running may be in the
    middle of writing it.  A missing file has no records.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return list(iter_jsonl(complete.splitlines(), source=os.fspath(path)))


def _get(
    rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    value = rec.get(key, default)
    if value is ...:
        raise AuditFormatError(f"audit record has no {key!r}: {dict(rec)!r}")
    if value is not default and not isinstance(value, kind):
        raise AuditFormatError(f"audit record field {key!r} is {value!r}: {dict(rec)!r}")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise AuditFormatError(f"audit record field {key!r} is {value!r}: {dict(rec)!r}")
    return value


def _peer(rec: Mapping[str, Any], *, guest: bool) -> Peer:
    pid = _get(rec, "pid", int, None)
    cmdline = _get(rec, "cmdline", list, [])
    if not all(isinstance(a, str) for a in cmdline):
        raise AuditFormatError(f"audit record cmdline is not a list of strings: {dict(rec)!r}")
    return Peer(pid, tuple(cmdline), guest, _get(rec, "principal", str, None))


# ------------------------------------------------------------------------------ xenstored


@dataclass(frozen=True, slots=True)
class XenstoreRequest:
    """One record of ``xenstored.jsonl``."""

    t: float
    conn: int
    #: The connection's domain: 0 for the privileged socket, the domain for a guest socket.
    domid: int
    priv: bool
    op: str
    #: The path of the request, or every path it touched (a committed transaction, a release).
    paths: tuple[str, ...]
    tx: int
    result: str
    rule: str | None
    peer: Peer

    @property
    def principal(self) -> Principal:
        return self.peer.principal

    @property
    def is_request(self) -> bool:
        """False for the records of a connection arriving or leaving."""
        return self.op not in CONNECTION_EVENTS

    @property
    def ok(self) -> bool:
        return self.result == "OK"

    @property
    def denied(self) -> bool:
        return self.result in DENIED_RESULTS

    @property
    def path_infos(self) -> tuple[PathInfo, ...]:
        return tuple(classify_path(p) for p in self.paths)

    @property
    def path_classes(self) -> frozenset[PathClass]:
        return frozenset(info.kind for info in self.path_infos)

    def touches(self, kind: PathClass, domid: int | None = None) -> bool:
        """Whether any path of the request is of class ``kind`` (about guest ``domid``)."""
        return any(
            info.kind is kind and (domid is None or info.domid == domid) for info in self.path_infos
        )


def parse_xenstored(rec: Mapping[str, Any]) -> XenstoreRequest:
    """A ``xenstored.jsonl`` record, checked."""
    priv = _get(rec, "priv", bool)
    path = _get(rec, "path", str, None)
    paths = _get(rec, "paths", list, None)
    found: list[str] = []
    if path is not None:
        found.append(path)
    if paths is not None:
        if not all(isinstance(p, str) for p in paths):
            raise AuditFormatError(f"audit record paths are not strings: {dict(rec)!r}")
        found.extend(p for p in paths if p not in found)
    # A guest-socket connection is the only unprivileged kind (xenstored_sim core.domains).
    guest = _get(rec, "guest", bool, not priv)
    return XenstoreRequest(
        t=float(_get(rec, "t", (int, float))),
        conn=_get(rec, "conn", int),
        domid=_get(rec, "domid", int),
        priv=priv,
        op=_get(rec, "op", str),
        paths=tuple(found),
        tx=_get(rec, "tx", int, 0),
        result=_get(rec, "result", str),
        rule=_get(rec, "rule", str, None),
        peer=_peer(rec, guest=guest),
    )


def read_xenstored(path: str | os.PathLike[str]) -> XenstoreAudit:
    return XenstoreAudit(parse_xenstored(r) for r in read_jsonl(path))


#: The keys :meth:`XenstoreAudit.count` can group by.
_KEYS: Final[dict[str, Callable[[XenstoreRequest], Iterable[object]]]] = {
    "principal": lambda r: (r.principal,),
    "op": lambda r: (r.op,),
    "path_class": lambda r: sorted(r.path_classes) or (PathClass.OTHER,),
    "privileged": lambda r: (r.priv,),
    "denied": lambda r: (r.denied,),
    "result": lambda r: (r.result,),
    "rule": lambda r: (r.rule,),
    "dm_domid": lambda r: (r.peer.dm_domid,),
}


class XenstoreAudit:
    """A queryable set of xenstore audit records.

    :meth:`where` narrows it down and :meth:`count` tallies what is left::

        audit.where(path_class=PathClass.PHYSMAP).count("principal")
    """

    def __init__(self, records: Iterable[XenstoreRequest]) -> None:
        self.records: tuple[XenstoreRequest, ...] = tuple(records)

    def __iter__(self) -> Iterator[XenstoreRequest]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def where(
        self,
        predicate: Callable[[XenstoreRequest], bool] | None = None,
        *,
        principal: Principal | None = None,
        op: str | None = None,
        path_class: PathClass | None = None,
        about: int | Iterable[int] | None = None,
        privileged: bool | None = None,
        ok: bool | None = None,
        denied: bool | None = None,
        requests_only: bool = True,
    ) -> XenstoreAudit:
        """The records that match every criterion given.

        ``about`` keeps requests with a path about that guest (or any of those guests), of
        ``path_class`` when that is given too.  Connection events are left out unless
        ``requests_only`` is False.
        """
        guests = {about} if isinstance(about, int) else set(about) if about is not None else None

        def keep(r: XenstoreRequest) -> bool:
            if requests_only and not r.is_request:
                return False
            if principal is not None and r.principal is not principal:
                return False
            if op is not None and r.op != op:
                return False
            if privileged is not None and r.priv != privileged:
                return False
            if ok is not None and r.ok != ok:
                return False
            if denied is not None and r.denied != denied:
                return False
            if path_class is not None or guests is not None:
                infos = [
                    i
                    for i in r.path_infos
                    if (path_class is None or i.kind is path_class)
                    and (guests is None or i.domid in guests)
                ]
                if not infos:
                    return False
            return predicate is None or predicate(r)

        return XenstoreAudit(r for r in self.records if keep(r))

    def count(self, *keys: str) -> Counter[Any]:
        """How many records there are per value of ``keys`` (one key: plain values; several:
        tuples).  A request that touches paths of two classes counts once in each."""
        if not keys:
            raise ValueError(f"count needs a key: one of {', '.join(_KEYS)}")
        unknown = [k for k in keys if k not in _KEYS]
        if unknown:
            raise ValueError(f"cannot count by {unknown[0]!r}: one of {', '.join(_KEYS)}")
        tally: Counter[Any] = Counter()
        for r in self.records:
            combos: list[tuple[object, ...]] = [()]
            for k in keys:
                combos = [(*c, v) for c in combos for v in _KEYS[k](r)]
            for c in combos:
                tally[c[0] if len(keys) == 1 else c] += 1
        return tally

    def physmap_ops(
        self, about: int | Iterable[int] | None = None, *, ok: bool | None = None
    ) -> dict[str, int]:
        """Requests on physmap paths per principal (every principal named, zeros included);
        with ``ok`` only those that succeeded (or failed)."""
        counts = self.where(path_class=PathClass.PHYSMAP, about=about, ok=ok).count("principal")
        out = {p.value: 0 for p in (Principal.TOOLSTACK, Principal.DEVICE_MODEL, Principal.GUEST)}
        for principal, n in counts.items():
            out[principal.value] = out.get(principal.value, 0) + n
        return out


# ----------------------------------------------------------------------------- hypervisor


@dataclass(frozen=True, slots=True)
class HypercallRecord:
    """One record of ``hypervisor.jsonl``: a hypercall, or an op of a guest's vCPU actor."""

    t: float
    conn: int | None
    call: str
    domid: int | None
    result: str
    #: ``None`` for a guest op, which no connection made.
    peer: Peer | None
    #: The guest op's name when ``call`` is ``"guest_op"``.
    op: str | None = None

    @property
    def principal(self) -> Principal:
        if self.peer is None:
            return Principal.GUEST if self.call == "guest_op" else Principal.OTHER
        return self.peer.principal


def parse_hypercall(rec: Mapping[str, Any]) -> HypercallRecord:
    raw_peer = _get(rec, "peer", dict, None)
    return HypercallRecord(
        t=float(_get(rec, "t", (int, float))),
        conn=_get(rec, "conn", int, None),
        call=_get(rec, "call", str),
        domid=_get(rec, "domid", int, None),
        result=_get(rec, "result", str),
        peer=None if raw_peer is None else _peer(raw_peer, guest=False),
        op=_get(rec, "op", str, None),
    )


def read_hypervisor(path: str | os.PathLike[str]) -> list[HypercallRecord]:
    return [parse_hypercall(r) for r in read_jsonl(path)]


# ------------------------------------------------------------------------------ toolstack


@dataclass(frozen=True, slots=True)
class ToolstackRecord:
    """One record of ``toolstack.jsonl``: an action an ``xl-sim`` command took."""

    t: float
    command: str
    action: str
    result: str
    pid: int | None = None
    domid: int | None = None
    #: The xenstore path, for a xenstore action.
    path: str | None = None
    #: The hypercall, QMP command or process step, for the other actions.
    call: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def parse_toolstack(rec: Mapping[str, Any]) -> ToolstackRecord:
    return ToolstackRecord(
        t=float(_get(rec, "t", (int, float))),
        command=_get(rec, "command", str),
        action=_get(rec, "action", str),
        result=_get(rec, "result", str),
        pid=_get(rec, "pid", int, None),
        domid=_get(rec, "domid", int, None),
        path=_get(rec, "path", str, None),
        call=_get(rec, "call", str, None),
    )


def read_toolstack(path: str | os.PathLike[str]) -> list[ToolstackRecord]:
    return [parse_toolstack(r) for r in read_jsonl(path)]

"""QMP, the QEMU Machine Protocol, as a sans-IO session (docs/interop/qmp-spec in QEMU).

The server speaks first with a greeting; the client must negotiate with ``qmp_capabilities``
before anything else; then each line is one JSON object ``{"execute", "arguments", "id"}`` and
gets one reply, ``{"return": ...}`` or ``{"error": {"class", "desc"}}``, echoing ``id``.
Asynchronous events ``{"event", "data", "timestamp"}`` may come at any time after
negotiation.  Error classes and wording follow QEMU's.

:meth:`QmpSession.receive_line` turns a line into either a :class:`Command` for the shell to
run, or a reply that is already decided (protocol errors, the negotiation itself).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

from xenhost.qmp import QmpError as QmpError  # raised to refuse a command

QEMU_VERSION: Final = {"qemu": {"major": 2, "minor": 10, "micro": 0}, "package": "physmap-lab"}
#: Longest request line; a longer one is answered with an error and dropped.
MAX_LINE: Final = 1 << 20

# name -> {argument: (json type, required)}
_STR, _BOOL, _LIST, _INT = "string", "boolean", "array", "integer"
SCHEMA: Final[dict[str, dict[str, tuple[str, bool]]]] = {
    "qmp_capabilities": {"enable": (_LIST, False)},
    "query-commands": {},
    "query-status": {},
    "stop": {},
    "cont": {},
    "quit": {},
    "xen-save-devices-state": {"filename": (_STR, True), "live": (_BOOL, False)},
    "xen-load-devices-state": {"filename": (_STR, True)},
    "x-physmap-info": {},
    "query-vnc": {},
    # qapi/ui.json: screendump (format since QEMU 7.1; the enum is checked when it runs).
    "screendump": {
        "filename": (_STR, True),
        "device": (_STR, False),
        "head": (_INT, False),
        "format": (_STR, False),
    },
    "xen-set-global-dirty-log": {"enable": (_BOOL, True)},
    "x-vram-dirty": {},
}
_PYTYPE: Final = {_STR: str, _BOOL: bool, _LIST: list, _INT: int}


@dataclass(frozen=True)
class Command:
    name: str
    arguments: dict[str, Any]
    id: Any  # echoed verbatim; absent when None and not given
    has_id: bool


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": QEMU_VERSION, "capabilities": []}}


def event(
    name: str, data: dict[str, Any] | None = None, now: float | None = None
) -> dict[str, Any]:
    t = time.time() if now is None else now
    seconds = int(t)
    msg: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)},
    }
    if data is not None:
        msg["data"] = data
    return msg


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


def _with_id(reply: dict[str, Any], has_id: bool, rid: Any) -> dict[str, Any]:
    if has_id:
        reply["id"] = rid
    return reply


def error_reply(
    desc: str, error_class: str = "GenericError", *, cmd: Command | None = None
) -> dict[str, Any]:
    reply = {"error": {"class": error_class, "desc": desc}}
    return _with_id(reply, cmd is not None and cmd.has_id, cmd.id if cmd else None)


def success_reply(cmd: Command, result: Any) -> dict[str, Any]:
    return _with_id({"return": result}, cmd.has_id, cmd.id)


class QmpSession:
    """One client's protocol state: negotiation, parsing, argument checking."""

    def __init__(self) -> None:
        self.negotiated = False

    def receive_line(self, line: bytes) -> Command | dict[str, Any] | None:
        """A command to run, an immediate reply, or None for a blank line (cf. QEMU's
        qmp_dispatch(): parse, check the negotiation state, check the arguments)."""
        text = line.strip()
        if not text:
            return None
        cmd = parse_command(text)
        if not isinstance(cmd, Command):
            return cmd
        name, args = cmd.name, cmd.arguments
        refused = self._refuse_before_negotiation(cmd)
        if refused is not None:
            return refused
        schema = SCHEMA.get(name)
        if schema is None:
            return error_reply(f"The command {name} has not been found", "CommandNotFound", cmd=cmd)
        bad = check_arguments(cmd, schema)
        if bad is not None:
            return bad
        if name == "qmp_capabilities":
            if args.get("enable"):
                return error_reply(f"Capability '{args['enable'][0]}' not available", cmd=cmd)
            self.negotiated = True
            return success_reply(cmd, {})
        if name == "query-commands":
            return success_reply(cmd, [{"name": n} for n in SCHEMA])
        return cmd

    def _refuse_before_negotiation(self, cmd: Command) -> dict[str, Any] | None:
        """Only ``qmp_capabilities`` before negotiation, and only once."""
        if cmd.name == "qmp_capabilities":
            if self.negotiated:
                return error_reply(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                    cmd=cmd,
                )
        elif not self.negotiated:
            return error_reply(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                "CommandNotFound",
                cmd=cmd,
            )
        return None


def parse_command(text: bytes) -> Command | dict[str, Any]:
    """One JSON line as a :class:`Command`, or the error reply QEMU gives for it."""
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error_reply(f"JSON parse error, {exc}")
    except RecursionError:
        return error_reply("JSON parse error, nesting too deep")
    if not isinstance(obj, dict):
        return error_reply("QMP input must be a JSON object")
    has_id = "id" in obj
    rid = obj.get("id")
    name = obj.get("execute")
    if name is None:
        return _with_id(error_reply("QMP input lacks member 'execute'"), has_id, rid)
    if not isinstance(name, str):
        return _with_id(error_reply("QMP input member 'execute' must be a string"), has_id, rid)
    unknown = sorted(set(obj) - {"execute", "arguments", "id"})
    if unknown:
        return _with_id(error_reply(f"QMP input member '{unknown[0]}' is unexpected"), has_id, rid)
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return _with_id(error_reply("QMP input member 'arguments' must be an object"), has_id, rid)
    return Command(name, args, rid, has_id)


def check_arguments(cmd: Command, schema: dict[str, tuple[str, bool]]) -> dict[str, Any] | None:
    """The error reply for the first argument that does not fit ``schema``, or None."""
    args = cmd.arguments
    for arg in args:
        if arg not in schema:
            return error_reply(f"Parameter '{arg}' is unexpected", cmd=cmd)
    for arg, (kind, required) in schema.items():
        if arg not in args:
            if required:
                return error_reply(f"Parameter '{arg}' is missing", cmd=cmd)
            continue
        value = args[arg]
        if not isinstance(value, _PYTYPE[kind]) or (kind != _BOOL and isinstance(value, bool)):
            return error_reply(f"Invalid parameter type for '{arg}', expected: {kind}", cmd=cmd)
    return None

"""The QMP session at the pure layer: negotiation, parsing and QEMU's error wording."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_model import qmp


def negotiated() -> qmp.QmpSession:
    s = qmp.QmpSession()
    assert s.receive_line(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    return s


def test_greeting_and_event_shapes() -> None:
    g = qmp.greeting()
    assert g["QMP"]["capabilities"] == [] and g["QMP"]["version"]["qemu"]["major"] == 2
    e = qmp.event("STOP", now=12.5)
    assert e == {"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 500000}}
    assert qmp.encode(e).endswith(b"\r\n")


def test_commands_before_negotiation_are_refused() -> None:
    s = qmp.QmpSession()
    reply = s.receive_line(b'{"execute": "query-status", "id": "a"}')
    assert reply == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": "a",
    }
    assert not s.negotiated


def test_negotiation_happens_once() -> None:
    s = negotiated()
    again = s.receive_line(b'{"execute": "qmp_capabilities"}')
    assert isinstance(again, dict) and again["error"]["class"] == "CommandNotFound"


def test_a_good_command_comes_out_with_its_id() -> None:
    s = negotiated()
    cmd = s.receive_line(
        b'{"execute": "xen-save-devices-state", "arguments": {"filename": "f"}, "id": 9}'
    )
    assert isinstance(cmd, qmp.Command)
    assert (cmd.name, cmd.arguments, cmd.id) == ("xen-save-devices-state", {"filename": "f"}, 9)
    assert qmp.success_reply(cmd, {}) == {"return": {}, "id": 9}
    plain = s.receive_line(b'{"execute": "stop"}')
    assert isinstance(plain, qmp.Command) and qmp.success_reply(plain, {}) == {"return": {}}


@pytest.mark.parametrize(
    "line, desc",
    [
        (b"{oops", "JSON parse error"),
        (b"[1]", "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "stop", "extra": 1}', "QMP input member 'extra' is unexpected"),
        (b'{"execute": "stop", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "stop", "arguments": {"x": 1}}', "Parameter 'x' is unexpected"),
        (b'{"execute": "xen-load-devices-state"}', "Parameter 'filename' is missing"),
        (
            b'{"execute": "xen-load-devices-state", "arguments": {"filename": 5}}',
            "Invalid parameter type for 'filename', expected: string",
        ),
        (
            b'{"execute": "xen-save-devices-state", "arguments": {"filename": "f", "live": 1}}',
            "Invalid parameter type for 'live', expected: boolean",
        ),
        (b'{"execute": "system_reset"}', "The command system_reset has not been found"),
    ],
)
def test_bad_requests_get_qemu_errors(line: bytes, desc: str) -> None:
    reply = negotiated().receive_line(line)
    assert isinstance(reply, dict)
    assert reply["error"]["desc"].startswith(desc)


def test_blank_lines_are_ignored() -> None:
    assert negotiated().receive_line(b"  \r") is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(obj=st.dictionaries(st.sampled_from(["execute", "arguments", "id", "x"]), _json))
def test_any_json_object_gets_a_command_or_a_reply(obj: dict[str, Any]) -> None:
    got = negotiated().receive_line(json.dumps(obj).encode())
    assert isinstance(got, qmp.Command | dict)
    if isinstance(got, dict):
        assert "error" in got or "return" in got
        json.dumps(got)


@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    got = negotiated().receive_line(data)
    assert got is None or isinstance(got, qmp.Command | dict)

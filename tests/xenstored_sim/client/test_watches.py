"""Watch routing and socket-path lookup, as plain function calls."""

from __future__ import annotations

import pytest

from xenstored_sim.client import WatchEvent, WatchTable, default_socket_path, watch_covers
from xenstored_sim.client.watches import parse_watch_event
from xenstored_sim.wire import Op, Packet, RemoteProtocolError


@pytest.mark.parametrize(
    ("watch", "event", "covered"),
    [
        ("/a", "/a", True),
        ("/a", "/a/b/c", True),
        ("/a", "/ab", False),
        ("/a/b", "/a", False),
        ("/", "/anything/at/all", True),
        ("/", "@releaseDomain", False),
        ("@releaseDomain", "@releaseDomain", True),
        ("@introduceDomain", "@releaseDomain", False),
        ("rel", "rel/x", True),
        ("rel", "/local/domain/0/rel/x", False),
    ],
)
def test_watch_covers(watch: str, event: str, covered: bool) -> None:
    assert watch_covers(watch, event) is covered


def test_route_by_token_then_path() -> None:
    table: WatchTable[str] = WatchTable()
    table.add("/a", "t1", "A1")
    table.add("/a/b", "t1", "AB1")
    table.add("/a", "t2", "A2")
    assert table.route(WatchEvent("/a/b/c", "t1")) == ["A1", "AB1"]
    assert table.route(WatchEvent("/a/x", "t1")) == ["A1"]
    assert table.route(WatchEvent("/a/x", "t2")) == ["A2"]
    assert table.route(WatchEvent("/a/x", "t3")) == []
    assert len(table) == 3 and ("/a", "t2") in table


def test_duplicate_watch_is_refused_and_removal_forgets() -> None:
    table: WatchTable[str] = WatchTable()
    table.add("/a", "t", "first")
    with pytest.raises(KeyError):
        table.add("/a", "t", "second")
    assert table.remove("/a", "t") == "first"
    assert table.remove("/a", "t") is None
    assert table.route(WatchEvent("/a", "t")) == []
    table.add("/a", "t", "again")
    assert table.clear() == ["again"] and len(table) == 0


def test_parse_watch_event() -> None:
    assert parse_watch_event(Packet(Op.WATCH_EVENT, 0, 0, b"/a/b\0tok\0")) == WatchEvent(
        "/a/b", "tok"
    )
    for bad in (b"/a\0", b"/a\0tok", b"/a\0tok\0extra\0", b""):
        with pytest.raises(RemoteProtocolError):
            parse_watch_event(Packet(Op.WATCH_EVENT, 0, 0, bad))


@pytest.mark.parametrize(
    ("env", "path"),
    [
        ({"XENSTORED_PATH": "/p/sock", "XENSTORED_RUNDIR": "/r"}, "/p/sock"),
        ({"XENSTORED_RUNDIR": "/r"}, "/r/socket"),
        ({"XENSTORED_PATH": "", "XENSTORED_RUNDIR": "/r"}, "/r/socket"),
        ({}, "/var/run/xenstored/socket"),
    ],
)
def test_default_socket_path(env: dict[str, str], path: str) -> None:
    assert default_socket_path(env) == path


def test_default_socket_path_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    monkeypatch.setenv("XENSTORED_RUNDIR", "/somewhere")
    assert default_socket_path() == "/somewhere/socket"

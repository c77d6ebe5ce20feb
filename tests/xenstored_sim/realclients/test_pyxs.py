"""pyxs 0.4.1 from PyPI, a synchronous threaded client, against the daemon.

What pyxs's own daemon tests expect is summarised in docs/xenstore.md, 'Real clients'.  pyxs refuses
RELEASE/RESUME/SET_TARGET client-side unless ``Client.SU`` is true, which it reads from
``/proc/xen/capabilities``; the tests set it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from pyxs import Client, PyXSError

# The conftest's Daemon; conftest is no module.
Daemon = Any
T = TypeVar("T")

# Bounds a blocking pyxs call on a daemon that never answers; a correct run takes milliseconds.
LIMIT = 10


def bounded(fn: Callable[[], T]) -> T:
    """Run a blocking pyxs call in a thread; a hang fails the test instead of the suite."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(LIMIT)
    assert not thread.is_alive(), "pyxs call did not return"
    if error:
        raise error[0]
    return result[0]


@pytest.fixture
def client(xenstored: Daemon) -> Iterator[Client]:
    with Client(unix_socket_path=xenstored.socket) as c:
        yield c


def errno_of(exc: pytest.ExceptionInfo[PyXSError]) -> int:
    return int(exc.value.args[0])


def test_read_write_mkdir_list_exists_delete(client: Client) -> None:
    client.write(b"/py/a", b"hello")
    assert client.read(b"/py/a") == b"hello"
    client.mkdir(b"/py/dir")
    assert client.read(b"/py/dir") == b""
    assert client.list(b"/py") == [b"a", b"dir"]
    assert client.list(b"/py/dir") == []
    assert client.exists(b"/py/dir")
    assert not client.exists(b"/py/missing")
    with pytest.raises(PyXSError) as exc:
        client.read(b"/py/missing")
    assert errno_of(exc) == errno.ENOENT
    assert client.read(b"/py/missing", b"default") == b"default"
    with pytest.raises(PyXSError) as exc:
        client.list(b"/py/missing")
    assert errno_of(exc) == errno.ENOENT
    client.delete(b"/py/dir")
    assert client.list(b"/py") == [b"a"]
    assert client.read(b"/py") == b""


def test_perms(client: Client) -> None:
    client.mkdir(b"/py/p")
    assert client.get_perms(b"/py/p") == [b"n0"]
    client.set_perms(b"/py/p", [b"b0"])
    assert client.get_perms(b"/py/p") == [b"b0"]
    client.set_perms(b"/py/p", [b"b0", b"r3", b"w4"])
    assert client.get_perms(b"/py/p") == [b"b0", b"r3", b"w4"]
    with pytest.raises(PyXSError) as exc:
        client.set_perms(b"/py/missing", [b"n0"])
    assert errno_of(exc) == errno.ENOENT


def test_transaction_commit_and_rollback(client: Client) -> None:
    assert client.transaction() != 0
    client.write(b"/py/tx", b"1")
    assert client.read(b"/py/tx") == b"1"
    assert client.commit() is True
    assert client.read(b"/py/tx") == b"1"
    client.transaction()
    client.write(b"/py/tx", b"2")
    client.rollback()
    assert client.read(b"/py/tx") == b"1"


def test_transaction_conflict_reports_false(xenstored: Daemon, client: Client) -> None:
    client.write(b"/py/c", b"0")
    client.transaction()
    assert client.read(b"/py/c") == b"0"
    with Client(unix_socket_path=xenstored.socket) as other:
        other.write(b"/py/c", b"other")
    client.write(b"/py/c", b"mine")
    assert client.commit() is False
    assert client.read(b"/py/c") == b"other"


def test_walk(client: Client) -> None:
    client.write(b"/py/w/a/b", b"1")
    client.write(b"/py/w/c", b"2")
    walked = list(client.walk(b"/py/w"))
    assert walked == [
        (b"/py/w", b"", [b"a", b"c"]),
        (b"/py/w/a", b"", [b"b"]),
        (b"/py/w/a/b", b"1", []),
        (b"/py/w/c", b"2", []),
    ]


def test_domain_path_and_introduction(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get_domain_path(0) == b"/local/domain/0"
    assert client.get_domain_path(999) == b"/local/domain/999"
    assert client.is_domain_introduced(0)
    assert not client.is_domain_introduced(5)
    client.introduce_domain(5, 1234, 7)
    assert client.is_domain_introduced(5)
    monkeypatch.setattr(Client, "SU", True)
    client.resume_domain(5)
    client.release_domain(5)
    assert not client.is_domain_introduced(5)


def test_monitor(xenstored: Daemon, client: Client) -> None:
    monitor = client.monitor()
    monitor.watch(b"/py/w", b"tok")
    monitor.watch(b"/py/w", b"tok2")
    with Client(unix_socket_path=xenstored.socket) as writer:
        writer.write(b"/py/w", b"x")
        writer.write(b"/py/w/sub", b"y")
        writer.delete(b"/py/w")
    events = monitor.wait()
    got = bounded(lambda: [tuple(next(events)) for _ in range(8)])
    by_token = {tok: [p for p, t in got if t == tok] for tok in (b"tok", b"tok2")}
    expected = [b"/py/w", b"/py/w", b"/py/w/sub", b"/py/w"]
    assert by_token == {b"tok": expected, b"tok2": expected}
    monitor.unwatch(b"/py/w", b"tok")
    monitor.close()
    assert monitor.watched == set()

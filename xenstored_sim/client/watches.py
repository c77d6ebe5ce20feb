"""Demultiplexing WATCH_EVENTs to the watches of one connection, without I/O.

A WATCH_EVENT carries the *changed* path and the token (docs/xenstore.md, 'Payloads'), not the path
the watch was registered on, so an event is routed to every watch with that token whose path
is the event path or one of its ancestors.  That is the same rule the daemon uses to fire it
(C ``watch.c`` ``is_child``; docs/xenstore.md, 'Watches'), and every event a daemon sends
satisfies it: the initial event carries the watch path as given, relative watches get relative
paths, and a removed descendant fires with the watch's own path.  Two watches on overlapping paths
that share a token cannot be told apart on the wire: each receives every event of the other that
falls under its own path.  Give such watches distinct tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar, final

from ..wire import Packet, RemoteProtocolError

__all__ = ["WatchEvent", "WatchTable", "parse_watch_event", "watch_covers"]

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One WATCH_EVENT: the path that changed (or the watch path, for the initial event)."""

    path: str
    token: str


def parse_watch_event(packet: Packet) -> WatchEvent:
    """Decode a WATCH_EVENT payload ``<path>\\0<token>\\0``.

    Raises:
        RemoteProtocolError: the payload is not two NUL-terminated strings.
    """
    parts = packet.payload.split(b"\0")
    if len(parts) != 3 or parts[2] != b"":
        raise RemoteProtocolError(f"malformed WATCH_EVENT payload {packet.payload!r}")
    return WatchEvent(_text(parts[0]), _text(parts[1]))


def watch_covers(watch_path: str, event_path: str) -> bool:
    """Whether a watch on ``watch_path`` fires for a change of ``event_path``.

    ``/`` covers every absolute path but no ``@`` name (docs/xenstore.md, 'Watches').
    """
    if event_path == watch_path:
        return True
    if watch_path == "/":
        return event_path.startswith("/")
    return event_path.startswith(watch_path + "/")


@final
class WatchTable(Generic[S]):
    """(path, token) -> sink, one entry per registered watch of a connection."""

    __slots__ = ("_by_token",)

    def __init__(self) -> None:
        self._by_token: dict[str, dict[str, S]] = {}

    def __len__(self) -> int:
        return sum(len(paths) for paths in self._by_token.values())

    def __contains__(self, key: tuple[str, str]) -> bool:
        path, token = key
        return path in self._by_token.get(token, {})

    def add(self, path: str, token: str, sink: S) -> None:
        """Register a watch; the same (path, token) twice is refused, as by the daemon
        (docs/xenstore.md, 'Watches')."""
        paths = self._by_token.setdefault(token, {})
        if path in paths:
            raise KeyError((path, token))
        paths[path] = sink

    def remove(self, path: str, token: str) -> S | None:
        """Unregister a watch and return its sink (None if it was not registered)."""
        paths = self._by_token.get(token)
        if paths is None:
            return None
        sink = paths.pop(path, None)
        if not paths:
            del self._by_token[token]
        return sink

    def route(self, event: WatchEvent) -> list[S]:
        """The sinks of every watch this event belongs to (none for a watch already removed)."""
        paths = self._by_token.get(event.token, {})
        return [sink for path, sink in paths.items() if watch_covers(path, event.path)]

    def clear(self) -> list[S]:
        """Unregister every watch and return their sinks."""
        sinks = [sink for paths in self._by_token.values() for sink in paths.values()]
        self._by_token.clear()
        return sinks


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")

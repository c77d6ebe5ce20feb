"""Watch registrations and their matching (xenstore-facts.md §4).

A change at path P fires every watch on P or on an ancestor of P; ``/`` matches every
non-special path, and an ``@`` name matches only itself.  Watches fire per connection in
connection order and, within one connection, in registration order (C walks its connection
list, then each connection's watch list; the oracle's golden transcript shows that order).
"""

from __future__ import annotations

from typing import Final

_FEW_PATHS: Final = 16


class Watch:
    """One WATCH: ``path`` is absolute; ``relative`` watches report relative event paths."""

    __slots__ = ("conn_id", "path", "relative", "seq", "token")

    def __init__(self, conn_id: int, path: str, token: bytes, relative: bool, seq: int) -> None:
        self.conn_id = conn_id
        self.path = path
        self.token = token
        self.relative = relative
        self.seq = seq


def _order(w: Watch) -> tuple[int, int]:
    return (w.conn_id, w.seq)


class WatchRegistry:
    """All watches, indexed by path for matching and by connection for cleanup."""

    __slots__ = ("_by_conn", "_by_path", "_seq")

    def __init__(self) -> None:
        self._by_path: dict[str, list[Watch]] = {}
        self._by_conn: dict[int, dict[tuple[str, bytes], Watch]] = {}
        self._seq = 0

    def add(self, conn_id: int, path: str, token: bytes, relative: bool) -> Watch | None:
        """Register; None if the connection already has this (path, token) (EEXIST)."""
        mine = self._by_conn.setdefault(conn_id, {})
        key = (path, token)
        if key in mine:
            return None
        self._seq += 1
        watch = Watch(conn_id, path, token, relative, self._seq)
        mine[key] = watch
        self._by_path.setdefault(path, []).append(watch)
        return watch

    def has(self, conn_id: int, path: str, token: bytes) -> bool:
        mine = self._by_conn.get(conn_id)
        return mine is not None and (path, token) in mine

    def remove(self, conn_id: int, path: str, token: bytes) -> bool:
        mine = self._by_conn.get(conn_id)
        watch = mine.pop((path, token), None) if mine else None
        if watch is None:
            return False
        self._unindex(watch)
        return True

    def remove_conn(self, conn_id: int) -> int:
        """Drop every watch of a connection; returns how many there were."""
        mine = self._by_conn.pop(conn_id, None)
        if not mine:
            return 0
        for watch in mine.values():
            self._unindex(watch)
        return len(mine)

    def count(self, conn_id: int) -> int:
        return len(self._by_conn.get(conn_id, ()))

    def of_conn(self, conn_id: int) -> list[Watch]:
        return list(self._by_conn.get(conn_id, {}).values())

    def _unindex(self, watch: Watch) -> None:
        lst = self._by_path[watch.path]
        lst.remove(watch)
        if not lst:
            del self._by_path[watch.path]

    def exact(self, path: str) -> list[Watch]:
        """Watches registered on exactly ``path`` (a removed descendant fires only these)."""
        return list(self._by_path.get(path, ()))

    def matching(self, path: str) -> list[Watch]:
        """Watches on ``path`` or an ancestor, in delivery order."""
        by_path = self._by_path
        if not by_path:
            return []
        found: list[Watch] = []
        if len(by_path) <= _FEW_PATHS or path[0] == "@":
            for wpath, ws in by_path.items():
                if wpath == path or (
                    path.startswith(wpath) and (wpath == "/" or path[len(wpath)] == "/")
                ):
                    found.extend(ws)
        else:
            # Walk up the ancestors: no per-level recursion, and cost bounded by the depth.
            p = path
            while True:
                hit = by_path.get(p)
                if hit:
                    found.extend(hit)
                if p == "/":
                    break
                i = p.rfind("/")
                p = p[:i] if i > 0 else "/"
        if len(found) > 1:
            found.sort(key=_order)
        return found

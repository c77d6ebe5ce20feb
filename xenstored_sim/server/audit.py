"""The audit log: one JSON object per line (``--audit-log``)."""

from __future__ import annotations

import json
from typing import Any, TextIO


class AuditLog:
    """Appends records to a file.  Each batch is flushed at once, so a client that has its
    reply also finds the record of its request in the file."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def write(self, records: list[dict[str, Any]]) -> None:
        if records:
            self._file.write("".join(self._encode(r) + "\n" for r in records))
            self._file.flush()

    def close(self) -> None:
        self._file.close()

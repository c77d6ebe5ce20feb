"""The toolstack's own audit record, ``RUNDIR/audit/toolstack.jsonl`` (docs/architecture.md).

One JSON object per line for every xenstore, hypervisor, QMP and process action the toolstack
takes: ``t`` (Unix time), ``command`` (the xl-sim command), ``action``, ``path`` (xenstore) or
``call`` (hypercall, QMP command, process step), ``domid`` where there is one, and ``result``
(``"ok"`` or an error name).  Nothing is recorded unless ``RUNDIR/audit`` exists.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

import xenhost


class Audit:
    def __init__(self, rundir: Path, command: str) -> None:
        self.command = command
        self._file: TextIO | None = None
        directory = xenhost.RunDir(rundir).audit_dir
        if directory.is_dir():
            self._file = open(xenhost.RunDir(rundir).audit_log("toolstack"), "a", encoding="utf-8")  # noqa: SIM115

    def record(self, action: str, result: str = "ok", **fields: Any) -> None:
        if self._file is None:
            return
        entry: dict[str, Any] = {"t": time.time(), "command": self.command, "action": action}
        entry.update({k: v for k, v in fields.items() if v is not None})
        entry["result"] = result
        entry["pid"] = os.getpid()
        self._file.write(json.dumps(entry, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

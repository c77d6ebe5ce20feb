"""The ``-T/--trace-file`` log, in C xenstored 4.17's format.

cf. tools/xenstore/xenstored_core.c: trace_io() writes one line per message, ``IN`` for a
request when it is processed and ``OUT`` for a reply or watch event, with the connection's
address, the local time, the type name (sockmsg_string()) and the payload with each NUL shown
as a space; trace_create()/trace_destroy() log connections coming and going.  The connection
"address" here is a stable made-up one per connection.
"""

from __future__ import annotations

import time
from typing import BinaryIO

from ..wire import Op, Packet

_NAMES = {int(op): op.name for op in Op}
_BASE = 0x55D0_0000_0000


def conn_addr(conn_id: int) -> str:
    return f"{_BASE + conn_id * 0x1000:#x}"


class Tracer:
    """Appends trace lines to a file (opened once, line-buffered writes)."""

    def __init__(self, path: str) -> None:
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - lives as long as the daemon

    def io(self, conn_id: int, packet: Packet, out: bool) -> None:
        stamp = time.strftime("%Y%m%d %H:%M:%S", time.localtime())
        name = _NAMES.get(packet.op, "**UNKNOWN**")
        head = f"{'OUT' if out else 'IN'} {conn_addr(conn_id)} {stamp} {name} ("
        self._file.write(head.encode() + packet.payload.replace(b"\0", b" ") + b")\n")
        self._file.flush()

    def connection(self, conn_id: int, created: bool) -> None:
        what = "CREATE" if created else "DESTROY"
        self._file.write(f"{what} connection {conn_addr(conn_id)}\n".encode())
        self._file.flush()

    def close(self) -> None:
        self._file.close()

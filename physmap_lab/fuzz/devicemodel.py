"""Fuzzing qemu-model over QMP.

Random and mutated QMP lines go to a running device model (built by the toolstack), each batch
followed by ``query-status``, whose answer must come.  Afterwards the device model must still
run, answer ``x-physmap-info`` and have logged no traceback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio

from .generators import QmpLineMaker
from .report import PROGRESS_LIMIT, FuzzReport


class QmpLines:
    """QMP replies, one JSON object a line, skipping events."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def reply(self) -> dict[str, object]:
        while True:
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                if not line.strip():
                    continue
                msg = json.loads(line)
                if isinstance(msg, dict) and "event" not in msg:
                    return msg
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise trio.BrokenResourceError("the device model closed QMP")
            self.buf += chunk

    async def execute(self, command: str, **arguments: object) -> dict[str, object]:
        msg: dict[str, object] = {"execute": command, "id": "fuzz-sync"}
        if arguments:
            msg["arguments"] = arguments
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self.reply()
            if reply.get("id") == "fuzz-sync":
                return reply


async def fuzz_qmp(
    qmp_path: Path, lines: int, seed: int, scratch: Path, *, max_nesting: int = 5000
) -> FuzzReport:
    """Send ``lines`` random and mutated lines to the QMP socket ``qmp_path`` in batches, each
    followed by a ``query-status`` that must be answered.  The caller checks the process."""
    report = FuzzReport()
    start = time.monotonic()
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "garbage").write_bytes(b"\x93\x01\x02\x03 not a device state")
    rng = QmpLineMaker(seed, scratch, max_nesting=max_nesting)
    sent = 0
    try:
        while sent < lines:
            stream = await trio.open_unix_socket(str(qmp_path))
            report.connections += 1
            async with stream:
                q = QmpLines(stream)
                with trio.fail_after(PROGRESS_LIMIT):
                    await q.reply()  # the greeting
                    if rng.random() < 0.9:
                        await q.execute("qmp_capabilities")
                for _ in range(rng.randint(1, 20)):
                    batch = [rng.line() for _ in range(rng.randint(1, 8))]
                    sent += len(batch)
                    report.frames += len(batch)
                    await stream.send_all(b"\n".join(batch) + b"\n")
                    with trio.fail_after(PROGRESS_LIMIT):
                        reply = await q.execute("query-status")
                    if "error" in reply and "negotiation" not in json.dumps(reply):
                        report.problems.append(f"query-status failed: {reply}")
                    report.good_requests += 1
                    if sent >= lines:
                        break
                # Make sure a stop from the fuzz does not leave the guest paused for the next.
                with trio.fail_after(PROGRESS_LIMIT):
                    await q.execute("qmp_capabilities")
                    await q.execute("cont")
    except trio.TooSlowError:
        report.problems.append(f"query-status took over {PROGRESS_LIMIT} s")
    except (OSError, trio.BrokenResourceError, ValueError) as exc:
        report.problems.append(f"QMP failed: {exc!r}")
    report.seconds = time.monotonic() - start
    return report

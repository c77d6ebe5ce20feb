"""A wire fuzzer for xenstored-sim: ``python -m physmap_lab.fuzz --frames N [--seed S]``.

Theory of operation.  Several workers open connections to the privileged socket and to guest
sockets at once and send random and mutated frames: valid requests with damaged payloads,
unknown op numbers (15, 16, 20, 23 and beyond), random transaction ids, bad UTF-8, NULs in odd
places, truncated headers, lengths over 4096 (the daemon must drop that connection and only
it, xenstore-facts.md §1.10 and §9.21), and connections closed half-way through a frame.
Meanwhile a well-behaved privileged client and a well-behaved guest keep doing round trips,
each of which must complete within a generous limit.  Afterwards the daemon must still run,
must not have logged a traceback, must pass CONTROL ``check``, serve a fresh connection, and
its tree (walked by DIRECTORY from ``/``) must be consistent with its own per-domain node
accounting (CONTROL ``quota <domid>``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.wire import Op, XsError

from .stack import terminate

HEADER: Final = struct.Struct("=IIII")
#: Domains the fuzzer introduces and aims at; the well-behaved guest is outside this range.
FUZZ_DOMIDS: Final = tuple(range(1, 9))
GOOD_DOMID: Final = 1000
#: How long one well-behaved round trip may take while the fuzzing goes on.
PROGRESS_LIMIT: Final = 10.0

_NAMES: Final = (b"a", b"b", b"vm", b"device", b"backend", b"x-1", b"_", b"@", b"data", b"0")
_VALID_OPS: Final = (
    Op.DIRECTORY,
    Op.READ,
    Op.GET_PERMS,
    Op.WATCH,
    Op.UNWATCH,
    Op.TRANSACTION_START,
    Op.TRANSACTION_END,
    Op.INTRODUCE,
    Op.RELEASE,
    Op.GET_DOMAIN_PATH,
    Op.WRITE,
    Op.MKDIR,
    Op.RM,
    Op.SET_PERMS,
    Op.IS_DOMAIN_INTRODUCED,
    Op.RESUME,
    Op.SET_TARGET,
    Op.RESET_WATCHES,
    Op.DIRECTORY_PART,
    Op.CONTROL,
)
_CONTROL: Final = (b"check", b"help", b"log", b"print", b"quota", b"quota-soft", b"logfile")


class FrameMaker(random.Random):
    """Random and mutated request frames.  ``frame()`` returns the bytes and whether the
    daemon is expected to drop the connection after them."""

    def path(self) -> bytes:
        parts = [self.choice(_NAMES) for _ in range(self.randint(0, 4))]
        roll = self.random()
        if roll < 0.4:
            base = b"/local/domain/%d" % self.choice(FUZZ_DOMIDS)
            return base + b"".join(b"/" + p for p in parts)
        if roll < 0.6:
            return b"/".join(parts) or b"a"  # relative
        if roll < 0.7:
            return self.choice((b"@introduceDomain", b"@releaseDomain", b"/local/domain/", b"/"))
        return b"/" + b"/".join(parts)

    def perms(self) -> bytes:
        n = self.randint(1, 4)
        return b"".join(
            b"%c%d\0" % (self.choice(b"nrwbx"), self.choice((*FUZZ_DOMIDS, 0, 99)))
            for _ in range(n)
        )

    def payload(self, op: int) -> bytes:
        """A plausible payload for ``op``."""
        domid = self.choice(FUZZ_DOMIDS)
        if op in (Op.WRITE,):
            return self.path() + b"\0" + self.randbytes(self.choice((0, 1, 8, 64)))
        if op == Op.SET_PERMS:
            return self.path() + b"\0" + self.perms()
        if op in (Op.WATCH, Op.UNWATCH):
            return self.path() + b"\0tok%d\0" % self.randint(0, 3)
        if op == Op.TRANSACTION_END:
            return self.choice((b"T\0", b"F\0", b"X\0", b""))
        if op == Op.TRANSACTION_START:
            return b"\0"
        if op == Op.INTRODUCE:
            return b"%d\0%d\0%d\0" % (domid, self.randint(0, 9), self.randint(0, 3))
        if op in (Op.RELEASE, Op.RESUME, Op.GET_DOMAIN_PATH, Op.IS_DOMAIN_INTRODUCED):
            return b"%d\0" % self.choice((domid, 0, 0x7FF0, 65536))
        if op == Op.SET_TARGET:
            return b"%d\0%d\0" % (domid, self.choice(FUZZ_DOMIDS))
        if op == Op.DIRECTORY_PART:
            return self.path() + b"\0%d\0" % self.randint(0, 20)
        if op == Op.CONTROL:
            return self.choice(_CONTROL) + b"\0" + self.choice((b"", b"1\0", b"set\0x\0"))
        if op == Op.RESET_WATCHES:
            return b""
        return self.path() + b"\0"

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.randint(1, 3)):
            kind = self.randrange(7)
            i = self.randint(0, len(buf))
            if kind == 0 and buf:
                buf[min(i, len(buf) - 1)] ^= 1 << self.randrange(8)
            elif kind == 1:
                buf[i:i] = b"\0"
            elif kind == 2:
                buf[i:i] = self.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"))
            elif kind == 3:
                del buf[i:]
            elif kind == 4:
                buf[i:i] = self.choice((b"//", b"/", b"..", b"%", b"\n", b" "))
            elif kind == 5:
                buf += self.randbytes(self.randint(1, 32))
            else:
                buf[i:i] = buf[: self.randint(0, 64)]
        return bytes(buf[:4096])

    def tx_id(self) -> int:
        return self.choice((0, 0, 0, 0, 1, 2, 3, self.getrandbits(32)))

    def frame(self, req_id: int) -> tuple[bytes, bool]:
        roll = self.random()
        if roll < 0.55:
            op = int(self.choice(_VALID_OPS))
            body = self.payload(op)
            if self.random() < 0.6:
                body = self.mutate(body)
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.80:
            op = self.choice((15, 16, 20, 23, 24, 25, 26, 99, 0xFFFF, self.getrandbits(32)))
            if self.random() < 0.5:
                op = self.randrange(30)
            body = self.randbytes(self.randint(0, 64))
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.997:
            # A valid request, unchanged: keeps the tree and transactions interesting.
            op = int(self.choice((Op.WRITE, Op.MKDIR, Op.READ, Op.DIRECTORY, Op.RM, Op.WATCH)))
            body = self.payload(op)
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.999:
            length = self.choice((4097, 65536, 1 << 31, 0xFFFFFFFF))
            return HEADER.pack(Op.WRITE, req_id, 0, length) + b"/x\0y", True
        # A truncated header: the connection ends here.
        whole = HEADER.pack(Op.READ, req_id, 0, 3) + b"/a\0"
        return whole[: self.randint(1, 15)], True


@dataclass
class FuzzReport:
    """What a fuzzing run did and found."""

    frames: int = 0
    connections: int = 0
    dropped: int = 0
    good_requests: int = 0
    seconds: float = 0.0
    crashes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and not self.problems

    def summary(self) -> str:
        check = "OK" if not self.problems else "FAILED: " + "; ".join(self.problems[:5])
        return (
            f"fuzz: frames={self.frames} connections={self.connections} "
            f"dropped={self.dropped} good-requests={self.good_requests} "
            f"seconds={self.seconds:.1f} crashes={self.crashes} invariants={check}"
        )


class _Budget:
    """Frames still to send, shared by the workers."""

    def __init__(self, frames: int) -> None:
        self.left = frames


#: The request id of the last request on a connection that reads its replies.
SYNC_ID: Final = 0xFFFFFFFF


async def _drain(stream: trio.SocketStream, synced: trio.Event) -> None:
    """Read and parse replies until the one to :data:`SYNC_ID` arrives or the peer hangs up."""
    buf = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while chunk := await stream.receive_some(65536):
            buf += chunk
            while len(buf) >= HEADER.size:
                _, req_id, _, n = HEADER.unpack_from(buf)
                if len(buf) < HEADER.size + n:
                    break
                buf = buf[HEADER.size + n :]
                if req_id == SYNC_ID:
                    synced.set()


async def _one_connection(
    rng: FrameMaker, rundir: Path, socket_path: Path, budget: _Budget, report: FuzzReport
) -> None:
    if rng.random() < 0.4:
        path = socket_path
    else:
        path = rundir / "domains" / f"{rng.choice(FUZZ_DOMIDS)}.sock"
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return  # a guest socket the fuzz released
    report.connections += 1
    n = rng.randint(1, 300)
    reads = rng.random() < 0.9
    synced = trio.Event()
    async with stream, trio.open_nursery() as nursery:
        if reads:
            nursery.start_soon(_drain, stream, synced)
        pending: list[bytes] = []
        ended = False
        try:
            with trio.move_on_after(5 if reads else 0.2):
                for i in range(n):
                    if budget.left <= 0:
                        break
                    budget.left -= 1
                    data, ends = rng.frame(i + 1)
                    report.frames += 1
                    pending.append(data)
                    if ends or len(pending) >= rng.randint(1, 32) or i == n - 1 or not budget.left:
                        await stream.send_all(b"".join(pending))
                        pending.clear()
                    if ends:
                        ended = True
                        report.dropped += 1
                        break
                if reads and not ended and rng.random() < 0.9:
                    # Wait until the daemon has handled everything, then close.
                    await stream.send_all(HEADER.pack(Op.GET_DOMAIN_PATH, SYNC_ID, 0, 2) + b"0\0")
                    await synced.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            report.dropped += 1
        if rng.random() < 0.2:
            # Half a frame, then hang up.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(HEADER.pack(Op.WRITE, 1, 0, 100)[: rng.randint(1, 16)])
        nursery.cancel_scope.cancel()


async def _worker(
    seed: int, rundir: Path, socket_path: Path, budget: _Budget, report: FuzzReport
) -> None:
    rng = FrameMaker(seed)
    while budget.left > 0:
        await _one_connection(rng, rundir, socket_path, budget, report)


async def _good_round(xs: XsClient, base: str, i: int) -> None:
    with trio.fail_after(PROGRESS_LIMIT):
        await xs.write(f"{base}/k{i % 5}", str(i))
        if await xs.read(f"{base}/k{i % 5}") != str(i).encode():
            raise AssertionError(f"{base}/k{i % 5} did not read back {i}")
        await xs.directory(base)


async def _good_client(path: str, base: str, report: FuzzReport, done: trio.Event) -> None:
    """Round trips that must keep completing while the fuzz runs."""
    async with open_xenstore(path) as xs:
        i = 0
        while not done.is_set() or i == 0:
            await _good_round(xs, base, i)
            report.good_requests += 3
            i += 1
            await trio.sleep(0.002)  # leave the daemon to the fuzz, mostly


async def _wait_for(path: Path) -> None:
    with trio.fail_after(PROGRESS_LIMIT):
        while not path.exists():
            await trio.sleep(0.01)


async def _set_up(socket_path: Path, rundir: Path) -> None:
    async with open_xenstore(str(socket_path)) as xs:
        for domid in (*FUZZ_DOMIDS, GOOD_DOMID):
            await xs.introduce(domid, 1, 1)
            home = f"/local/domain/{domid}"
            await xs.write(home, b"")
            await xs.set_perms(home, [f"n{domid}"])
        await xs.write("/vm/a", b"1")
        await xs.write("/good", b"")
    await _wait_for(rundir / "domains" / f"{GOOD_DOMID}.sock")


async def _walk(xs: XsClient) -> tuple[int, dict[int, int], list[str]]:
    """Nodes reachable from ``/``, their owners, and any inconsistency."""
    problems: list[str] = []
    owners: dict[int, int] = {}
    seen: set[str] = set()
    stack = ["/"]
    while stack:
        path = stack.pop()
        if path in seen:
            problems.append(f"{path} listed twice")
            continue
        seen.add(path)
        try:
            names = await xs.directory(path)
            perms = await xs.get_perms(path)
        except XsError as exc:
            problems.append(f"{path} listed by its parent but {exc}")
            continue
        owner = int(perms[0][1:])
        owners[owner] = owners.get(owner, 0) + 1
        if len(set(names)) != len(names):
            problems.append(f"{path} has duplicate children")
        stack.extend(("" if path == "/" else path) + "/" + n for n in names)
    return len(seen), owners, problems


async def _check_invariants(socket_path: Path, report: FuzzReport) -> None:
    with trio.fail_after(60):
        async with open_xenstore(str(socket_path)) as xs:
            check = await xs.control("check")
            if check.rstrip(b"\0") != b"OK":
                report.problems.append(f"CONTROL check answered {check!r}")
            await xs.write("/fuzz-fresh", b"alive")
            if await xs.read("/fuzz-fresh") != b"alive":
                report.problems.append("a fresh connection could not write and read back")
            await xs.rm("/fuzz-fresh")
            _, owners, problems = await _walk(xs)
            report.problems.extend(problems)
            for domid in (*FUZZ_DOMIDS, GOOD_DOMID):
                try:
                    text = await xs.control("quota", str(domid))
                except XsError:
                    continue  # released by the fuzz
                for line in text.rstrip(b"\0").decode().splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() == "nodes" and int(value) != owners.get(domid, 0):
                        report.problems.append(
                            f"domain {domid}: accounting says {int(value)} nodes, "
                            f"the tree has {owners.get(domid, 0)}"
                        )


async def fuzz_daemon(
    rundir: Path,
    frames: int,
    seed: int = 0,
    *,
    socket_path: Path | None = None,
    workers: int = 8,
) -> FuzzReport:
    """Fuzz the daemon serving ``rundir`` with ``frames`` frames, then check its invariants.

    The caller owns the daemon process and checks that it survived."""
    socket_path = socket_path or rundir / "socket"
    report = FuzzReport()
    start = time.monotonic()
    await _set_up(socket_path, rundir)
    budget = _Budget(frames)
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_good_client, str(socket_path), "/good", report, done)
            guest = str(rundir / "domains" / f"{GOOD_DOMID}.sock")
            nursery.start_soon(_good_client, guest, f"/local/domain/{GOOD_DOMID}/g", report, done)
            async with trio.open_nursery() as fuzzers:
                for w in range(workers):
                    fuzzers.start_soon(
                        _worker, seed * 1000 + w, rundir, socket_path, budget, report
                    )
            done.set()
    except trio.TooSlowError:
        report.problems.append(f"a well-behaved request took over {PROGRESS_LIMIT} s")
    except (XsError, AssertionError, trio.BrokenResourceError) as exc:
        report.problems.append(f"a well-behaved client failed: {exc!r}")
    report.seconds = time.monotonic() - start
    if not report.problems:
        await _check_invariants(socket_path, report)
    return report


def run(frames: int, seed: int) -> FuzzReport:
    """Start a private xenstored-sim, fuzz it and stop it."""
    with tempfile.TemporaryDirectory(prefix="xs-fuzz-") as tmp:
        rundir = Path(tmp) / "run"
        log = Path(tmp) / "xenstored-sim.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "xenstored_sim", "--rundir", str(rundir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            deadline = time.monotonic() + 20
            while not (rundir / "socket").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    report = FuzzReport(crashes=1, problems=["xenstored-sim did not start"])
                    return report
                time.sleep(0.02)
            report = trio.run(fuzz_daemon, rundir, frames, seed)
            if proc.poll() is not None:
                report.crashes += 1
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                report.crashes += text.count("Traceback")
                report.problems.append("the daemon logged a traceback:\n" + text[-2000:])
        finally:
            terminate(proc)
        return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m physmap_lab.fuzz", description="Fuzz xenstored-sim over its sockets."
    )
    parser.add_argument("--frames", type=int, default=100_000, help="frames to send")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"fuzz: seed={seed}", flush=True)
    report = run(args.frames, seed)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fuzzers for every daemon and parser of the stack:
``python -m physmap_lab.fuzz [--target toolstack|devicemodel|hypervisor|xenstored|all]
[--frames N] [--seed S]``.

xenstored.  Several workers open connections to the privileged socket and to guest
sockets at once and send random and mutated frames: valid requests with damaged payloads,
unknown op numbers (15, 16, 20, 23 and beyond), random transaction ids, bad UTF-8, NULs in odd
places, truncated headers, lengths over 4096 (the daemon must drop that connection and only
it, xenstore-facts.md §1.10 and §9.21), and connections closed half-way through a frame.
Meanwhile a well-behaved privileged client and a well-behaved guest keep doing round trips,
each of which must complete within a generous limit.  Afterwards the daemon must still run,
must not have logged a traceback, must pass CONTROL ``check``, serve a fresh connection, and
its tree (walked by DIRECTORY from ``/``) must be consistent with its own per-domain node
accounting (CONTROL ``quota <domid>``).

hypervisor.  Workers send random and mutated hypercall frames (msgpack with damaged or
retyped fields, unknown calls, garbage that is not msgpack, lengths over the frame limit) to
``hypervisor.sock``, aimed at a domain of their own, while a well-behaved client keeps making
round trips about another.  Afterwards hypervisor-sim must still run, have logged no traceback
and serve a fresh connection.

devicemodel.  Random and mutated QMP lines go to a running qemu-model (built by the toolstack),
each batch followed by ``query-status``, whose answer must come.  Afterwards the device model
must still run, answer ``x-physmap-info`` and have logged no traceback.

toolstack.  Mutated save images go through the toolstack's parser (only ``StreamError`` may
escape), and a share of them through ``xl-sim restore``, which must exit 0 or 1 with a message,
never a traceback, and after a failure leave no domain, xenstore tree or device model behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgpack
import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import (
    FrameDecoder,
    HypercallError,
    HypervisorDisconnected,
    MalformedMessage,
    ProtocolError,
    pack,
    unpack,
)
from toolstack import devicemodel
from toolstack.config import DomainConfig
from toolstack.image import copy_emulator_context, read_image
from toolstack.libxl import open_libxl
from toolstack.streamio import StreamError
from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.wire import Op, XsError

from .ready import accepts
from .stack import Stack, executable, open_stack, terminate

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
            while not accepts(str(rundir / "socket")):
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


# --------------------------------------------------------------------------------------------
# hypervisor-sim: hypercall frames

#: The fuzz's own domain: frames name it, or a number near it, or one picked at random.
_HV_TEMPLATES: Final[tuple[tuple[str, dict[str, object]], ...]] = (
    ("version", {}),
    ("domain_list", {}),
    ("domain_getinfo", {"domid": 0}),
    ("domain_pause", {"domid": 0}),
    ("domain_unpause", {"domid": 0}),
    ("populate_physmap", {"domid": 0, "gfns": [16, 17, 18]}),
    ("decrease_reservation", {"domid": 0, "gfns": [16]}),
    ("add_to_physmap", {"domid": 0, "space": "gmfn", "idx": 16, "gpfn": 40}),
    ("relocate_memory", {"domid": 0, "src_gfn": 17, "dst_gfn": 64, "nr": 2}),
    ("pin_memory_cacheattr", {"domid": 0, "start": 64, "end": 65, "type": 6}),
    ("sequence", {"calls": [["p2m", {"domid": 0}], ["add_to_physmap", {"domid": 0}]]}),
    ("p2m", {"domid": 0}),
    ("map_foreign", {"domid": 0, "gfns": [0, 1, 16, 99999]}),
    ("ioreq_server_create", {"domid": 0}),
    ("ioreq_server_destroy", {"domid": 0, "id": 1}),
    ("ioreq_complete", {"seq": 1, "data": 0}),
    ("guest", {"domid": 0, "ops": [{"op": "mem_read", "gpa": 0, "len": 8}]}),
    ("guest", {"domid": 0, "ops": [{"op": "pio_read", "port": 0x1CE, "size": 2}]}),
    ("guest_driver", {"domid": 0, "device": "stdvga", "action": "framebuffer", "params": {}}),
    ("restrict", {"domid": 0}),
    ("no_such_call", {}),
)


class HypercallFrameMaker(random.Random):
    """Random and mutated hypercall frames aimed at domain ``domid``.  ``frame()`` returns the
    bytes and whether the daemon is expected to drop the connection after them."""

    def __init__(self, seed: int, domid: int) -> None:
        super().__init__(seed)
        self.domid = domid

    def leaf(self) -> object:
        return self.choice(
            (
                None,
                True,
                -1,
                0,
                self.domid,
                self.domid + 1,
                1 << 40,
                -(1 << 63),
                (1 << 64) - 1,
                1.5,
                "",
                "x" * self.randint(1, 40),
                b"\x00\xff",
                [],
                [1, "a"],
                {},
                {"op": "mem_write", "gpa": 0, "data": b"hi"},
            )
        )

    def retype(self, doc: object) -> object:
        """``doc`` with one value inside it replaced, dropped or given a new key."""
        if isinstance(doc, dict) and doc and self.random() < 0.75:
            out = dict(doc)
            key = self.choice(sorted(out, key=repr))
            roll = self.random()
            if roll < 0.15:
                del out[key]
            elif roll < 0.25:
                out[self.choice(("extra", "id", "call", "args", 1, b"k"))] = self.leaf()
            else:
                out[key] = self.retype(out[key])
            return out
        if isinstance(doc, list) and doc and self.random() < 0.75:
            i = self.randrange(len(doc))
            return [*doc[:i], self.retype(doc[i]), *doc[i + 1 :]]
        return self.leaf()

    def request(self, req_id: int) -> dict[str, object]:
        call, args = self.choice(_HV_TEMPLATES)
        filled = {k: (self.domid if k == "domid" else v) for k, v in args.items()}
        return {"id": req_id, "call": call, "args": filled}

    def frame(self, req_id: int) -> tuple[bytes, bool]:
        roll = self.random()
        if roll < 0.35:
            body = msgpack.packb(self.request(req_id), use_bin_type=True)
        elif roll < 0.70:
            body = msgpack.packb(self.retype(self.request(req_id)), use_bin_type=True)
        elif roll < 0.85:
            flipped = bytearray(msgpack.packb(self.request(req_id), use_bin_type=True))
            for _ in range(self.randint(1, 3)):
                flipped[self.randrange(len(flipped))] ^= 1 << self.randrange(8)
            body = bytes(flipped)
        elif roll < 0.995:
            body = self.randbytes(self.randint(0, 48))
        else:
            length = self.choice((MAX_HV_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF))
            return struct.pack(">I", length) + b"\x80", True
        return struct.pack(">I", len(body)) + body, False


MAX_HV_FRAME: Final = 16 * 1024 * 1024


async def _hv_drain(stream: trio.SocketStream, synced: trio.Event, sync_id: int) -> None:
    dec = FrameDecoder()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
        while chunk := await stream.receive_some(65536):
            dec.receive_data(chunk)
            while isinstance(payload := dec.next_payload(), bytes):
                with contextlib.suppress(MalformedMessage):
                    if unpack(payload).get("id") == sync_id:
                        synced.set()


async def _hv_connection(
    rng: HypercallFrameMaker, path: Path, budget: _Budget, report: FuzzReport
) -> None:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        report.problems.append(f"hypervisor-sim refused a connection: {exc}")
        budget.left = 0
        return
    report.connections += 1
    sync_id = 1 << 30
    synced = trio.Event()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(_hv_drain, stream, synced, sync_id)
        try:
            with trio.move_on_after(PROGRESS_LIMIT):
                ended = False
                for i in range(rng.randint(1, 200)):
                    if budget.left <= 0:
                        break
                    budget.left -= 1
                    data, ends = rng.frame(i + 1)
                    report.frames += 1
                    await stream.send_all(data)
                    if ends:
                        ended = True
                        report.dropped += 1
                        break
                if not ended:
                    sync = {"id": sync_id, "call": "version", "args": {}}
                    await stream.send_all(pack(sync))
                    await synced.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            report.dropped += 1
        nursery.cancel_scope.cancel()


async def _hv_good_client(path: Path, domid: int, report: FuzzReport, done: trio.Event) -> None:
    async with open_hypervisor(path) as hv:
        while not done.is_set() or report.good_requests == 0:
            with trio.fail_after(PROGRESS_LIMIT):
                if (await hv.version())["xen"] != "4.17":
                    raise AssertionError("version changed")
                info = await hv.domain_getinfo(domid)
                if info["domid"] != domid:
                    raise AssertionError(f"domain_getinfo({domid}) answered {info}")
                await hv.domain_list()
            report.good_requests += 3
            await trio.sleep(0.002)


async def fuzz_hypervisor(
    socket_path: Path, frames: int, seed: int = 0, *, workers: int = 4
) -> FuzzReport:
    """Fuzz the hypervisor-sim serving ``socket_path`` with ``frames`` frames.

    The caller owns the daemon and checks that it survived and logged no traceback."""
    report = FuzzReport()
    start = time.monotonic()
    async with open_hypervisor(socket_path) as hv:
        good = await hv.domain_create("fuzz-good", 64)
        await hv.populate_physmap(good, range(16))
        target = await hv.domain_create("fuzz-target", 256)
        await hv.populate_physmap(target, range(16))
    budget = _Budget(frames)
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hv_good_client, socket_path, good, report, done)
            async with trio.open_nursery() as fuzzers:
                for w in range(workers):
                    rng = HypercallFrameMaker(seed * 1000 + w, target)
                    fuzzers.start_soon(_hv_worker, rng, socket_path, budget, report)
            done.set()
    except trio.TooSlowError:
        report.problems.append(f"a well-behaved hypercall took over {PROGRESS_LIMIT} s")
    except (HypercallError, HypervisorDisconnected, AssertionError) as exc:
        report.problems.append(f"the well-behaved client failed: {exc!r}")
    report.seconds = time.monotonic() - start
    if not report.problems:
        with trio.fail_after(PROGRESS_LIMIT):
            async with open_hypervisor(socket_path) as hv:
                await hv.version()
                await hv.domain_getinfo(good)
    return report


async def _hv_worker(
    rng: HypercallFrameMaker, path: Path, budget: _Budget, report: FuzzReport
) -> None:
    while budget.left > 0:
        await _hv_connection(rng, path, budget, report)


# --------------------------------------------------------------------------------------------
# qemu-model: QMP lines

_QMP_TEMPLATES: Final = (
    {"execute": "query-status"},
    {"execute": "query-status", "id": 1},
    {"execute": "x-physmap-info"},
    {"execute": "stop"},
    {"execute": "cont"},
    {"execute": "qmp_capabilities"},
    {"execute": "xen-save-devices-state", "arguments": {"filename": "", "live": False}},
    {"execute": "xen-load-devices-state", "arguments": {"filename": ""}},
    {"execute": "no-such-command", "arguments": {"a": 1}},
    {"execute": "query-status", "arguments": {"unexpected": True}},
)


class QmpLineMaker(random.Random):
    """Random and mutated QMP lines.  Device-state files are only ever read or written inside
    ``scratch``; ``quit`` is never sent on purpose."""

    def __init__(self, seed: int, scratch: Path, *, max_nesting: int = 5000) -> None:
        super().__init__(seed)
        self.scratch = scratch
        self.max_nesting = max_nesting

    def command(self) -> dict[str, object]:
        cmd = dict(self.choice(_QMP_TEMPLATES))
        if "arguments" in cmd and isinstance(cmd["arguments"], dict):
            args = dict(cmd["arguments"])
            if "filename" in args:
                name = self.choice(("state", "garbage", "missing", "state"))
                args["filename"] = str(self.scratch / name)
            cmd["arguments"] = args
        return cmd

    def line(self) -> bytes:
        roll = self.random()
        if roll < 0.3:
            return json.dumps(self.command()).encode()
        if roll < 0.6:
            cmd = self.command()
            key = self.choice(("execute", "arguments", "id", "extra"))
            cmd[key] = self.choice(
                (None, 1, -1, 1.5e308, "", "x" * 300, [], {}, {"filename": 3}, True)
            )
            return json.dumps(cmd).encode()
        if roll < 0.85:
            text = bytearray(json.dumps(self.command()).encode())
            for _ in range(self.randint(1, 3)):
                i = self.randrange(len(text))
                text[i] = (
                    self.choice(b'{}[]":,\\\x00\xff\x80 0e')
                    if self.random() < 0.7
                    else (text[i] ^ (1 << self.randrange(7)))
                )
            out = bytes(text)
            return out if b"quit" not in out else b"{}"
        return self.choice(
            (
                b"",
                b"   ",
                b"[" * self.randint(1, self.max_nesting),
                b'{"execute":' + b'"' + self.randbytes(16).hex().encode() + b'"}',
                self.randbytes(self.randint(1, 80)).replace(b"\n", b" "),
                b'"just a string"',
                b"123",
                b"null",
            )
        )


class _QmpLines:
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
                q = _QmpLines(stream)
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


# --------------------------------------------------------------------------------------------
# The toolstack: save images


class ImageMutator(random.Random):
    """Damage to a save image, aimed mostly at its structure: the headers at the front, the
    device state and END record at the back, and record headers found by their type words."""

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.randint(1, 3)):
            roll = self.random()
            if roll < 0.4:
                i = self.randrange(min(len(buf), 256))
            elif roll < 0.8:
                i = max(0, len(buf) - 1 - self.randrange(min(len(buf), 8192)))
            else:
                i = self.randrange(len(buf))
            kind = self.randrange(5)
            if kind == 0:
                buf[i] ^= 1 << self.randrange(8)
            elif kind == 1:
                word = self.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, self.getrandbits(32)))
                buf[i : i + 4] = word.to_bytes(4, "little")
            elif kind == 2:
                del buf[i:]
            elif kind == 3:
                buf[i:i] = self.randbytes(self.randint(1, 16))
            else:
                del buf[i : i + self.randint(1, 64)]
            if not buf:
                buf = bytearray(b"\0")
        return bytes(buf)


def parse_image_bytes(data: bytes) -> str | None:
    """Check ``data`` the way a restore does first: None if it is accepted, else the message.
    Any error but :class:`StreamError` propagates: that is the fuzz's finding."""
    f = io.BytesIO(data)
    try:
        index = read_image(f)
        copy_emulator_context(f, index, io.BytesIO())
    except StreamError as exc:
        return str(exc)
    return None


@dataclass
class RestoreOutcome:
    rc: int
    error: str | None
    traceback: bool
    domid: int | None = None


async def restore_image(rundir: Path, image: Path, env: dict[str, str]) -> RestoreOutcome:
    """``xl-sim restore image`` as its own process."""
    proc = await trio.run_process(
        [executable("xl-sim"), "--rundir", str(rundir), "--json", "restore", str(image)],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    try:
        out = json.loads(proc.stdout or b"{}")
    except ValueError:
        out = {"error": None}
    err = proc.stderr.decode(errors="replace")
    domid = out.get("domid")
    return RestoreOutcome(
        proc.returncode,
        out.get("error"),
        "Traceback" in err,
        domid if isinstance(domid, int) else None,
    )


async def leftovers(stack: Stack) -> list[str]:
    """Anything a failed restore may have left: domains, xenstore trees, device models."""
    found: list[str] = []
    async with open_hypervisor(stack.hypervisor_socket) as hv:
        found += [f"domain {d['domid']}" for d in await hv.domain_list()]
    async with open_xenstore(str(stack.xenstored_socket)) as xs:
        for path in ("/local/domain", "/libxl", "/local/domain/0/device-model"):
            try:
                names = await xs.directory(path)
            except XsError:
                continue
            found += [f"{path}/{n}" for n in names if n != "0"]
    qmp = stack.rundir / "qmp"
    if qmp.exists():
        found += [str(p) for p in qmp.iterdir()]
    return found


async def fuzz_restores(
    stack: Stack, image: bytes, count: int, seed: int, scratch: Path
) -> FuzzReport:
    """``count`` mutated copies of ``image`` through ``xl-sim restore`` on ``stack``."""
    report = FuzzReport()
    start = time.monotonic()
    rng = ImageMutator(seed)
    path = scratch / "mutated.img"
    before = set(await leftovers(stack))
    for _ in range(count):
        data = rng.mutate(image)
        path.write_bytes(data)
        report.frames += 1
        outcome = await restore_image(stack.rundir, path, stack.env())
        if outcome.traceback or outcome.rc not in (0, 1):
            report.crashes += 1
            report.problems.append(f"xl-sim restore exited {outcome.rc} with a traceback")
        elif outcome.rc == 1 and not outcome.error:
            report.problems.append("xl-sim restore failed without a message")
        elif outcome.rc == 0:
            report.good_requests += 1
            # The damage was in guest memory, or padding: a domain that works.  Remove it.
            if outcome.domid is None:
                report.problems.append("xl-sim restore succeeded without naming its domain")
                break
            async with open_libxl(stack.rundir, command="fuzz") as lx:
                await lx.destroy(outcome.domid)
        else:
            report.dropped += 1
            left = sorted(set(await leftovers(stack)) - before)
            if left:
                report.problems.append(f"a failed restore left {', '.join(left)}")
        if report.problems:
            break
    report.seconds = time.monotonic() - start
    return report


def fuzz_image_parser(image: bytes, count: int, seed: int) -> FuzzReport:
    """``count`` mutated images through the parser (no processes)."""
    report = FuzzReport()
    start = time.monotonic()
    rng = ImageMutator(seed)
    for _ in range(count):
        data = rng.mutate(image)
        report.frames += 1
        try:
            why = parse_image_bytes(data)
        except Exception as exc:  # the finding: anything but StreamError
            report.crashes += 1
            report.problems.append(f"the image parser raised {type(exc).__name__}: {exc}")
            break
        if why is None:
            report.good_requests += 1
        else:
            report.dropped += 1
    report.seconds = time.monotonic() - start
    return report


# --------------------------------------------------------------------------------------------
# Running the targets


def _traceback_in(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return text[-2000:] if "Traceback" in text else None


async def _stack_targets(
    reports: dict[str, FuzzReport],
    targets: Sequence[str],
    frames: int,
    lines: int,
    images: int,
    seed: int,
    tmp: Path,
    max_nesting: int,
) -> None:
    """Fuzz ``targets`` on one stack, filling ``reports`` as each finishes."""
    rundir = tmp / "run"
    async with open_stack(rundir) as stack:
        hv = stack.daemons["hypervisor"]
        if "hypervisor" in targets:
            report = await fuzz_hypervisor(stack.hypervisor_socket, frames, seed)
            if hv.process is None or hv.process.poll() is not None:
                report.crashes += 1
                report.problems.append("hypervisor-sim died")
            reports["hypervisor"] = report
        if "devicemodel" in targets:
            async with open_libxl(rundir, command="fuzz") as lx:
                created = await lx.create(DomainConfig(name="fuzz-dm", memory_mib=16))
            domid, pid = created.domid, created.dm_pid
            report = await fuzz_qmp(
                rundir / "qmp" / f"{domid}.sock", lines, seed, tmp / "dm", max_nesting=max_nesting
            )
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError):
                with trio.fail_after(PROGRESS_LIMIT):
                    stream = await trio.open_unix_socket(str(rundir / "qmp" / f"{domid}.sock"))
                    async with stream:
                        q = _QmpLines(stream)
                        await q.reply()
                        await q.execute("qmp_capabilities")
                        info = await q.execute("x-physmap-info")
                        if "return" not in info:
                            report.problems.append(f"x-physmap-info failed: {info}")
                        report.good_requests += 1
            if not devicemodel.pid_alive(pid):
                report.crashes += 1
                report.problems.append("qemu-model died")
            tail = _traceback_in(rundir / "dm" / f"{domid}.log")
            if tail is not None:
                report.crashes += 1
                report.problems.append(f"qemu-model logged a traceback:\n{tail}")
            reports["devicemodel"] = report
            async with open_libxl(rundir, command="fuzz") as lx:
                await lx.destroy(domid)
        if "toolstack" in targets:
            image_path = tmp / "good.img"
            async with open_libxl(rundir, command="fuzz") as lx:
                created = await lx.create(DomainConfig(name="fuzz-image", memory_mib=16))
                await lx.save(created.domid, image_path)
            image = image_path.read_bytes()
            report = fuzz_image_parser(image, max(images * 20, 1), seed)
            if report.ok:
                more = await fuzz_restores(stack, image, images, seed, tmp)
                report.frames += more.frames
                report.good_requests += more.good_requests
                report.dropped += more.dropped
                report.crashes += more.crashes
                report.problems += more.problems
                report.seconds += more.seconds
                report.connections = more.frames
            reports["toolstack"] = report
        tail = _traceback_in(rundir / "logs" / "hypervisor.log")
        if tail is not None and "hypervisor" in reports:
            reports["hypervisor"].crashes += 1
            reports["hypervisor"].problems.append(f"hypervisor-sim logged a traceback:\n{tail}")


def run_targets(
    targets: Sequence[str],
    frames: int,
    seed: int,
    *,
    lines: int,
    images: int,
    max_nesting: int = 5000,
) -> dict[str, FuzzReport]:
    """Fuzz each of ``targets`` on a private stack; one report each."""
    reports: dict[str, FuzzReport] = {}
    rest = [t for t in targets if t != "xenstored"]
    if rest:
        with tempfile.TemporaryDirectory(prefix="stack-fuzz-") as tmp:
            try:
                trio.run(
                    _stack_targets,
                    reports,
                    rest,
                    frames,
                    lines,
                    images,
                    seed,
                    Path(tmp),
                    max_nesting,
                )
            except Exception as exc:  # a daemon gone or a harness failure: the run failed
                why = f"the run stopped: {type(exc).__name__}: {exc}"
                for name in rest:
                    if name not in reports:
                        reports[name] = FuzzReport(problems=[why])
                        break
            finally:
                stop_leftover_device_models(Path(tmp) / "run")
    if "xenstored" in targets:
        try:
            reports["xenstored"] = run(frames, seed)
        except Exception as exc:
            reports["xenstored"] = FuzzReport(
                problems=[f"the run stopped: {type(exc).__name__}: {exc}"]
            )
    return reports


def stop_leftover_device_models(rundir: Path) -> None:
    """SIGKILL any qemu-model still serving ``rundir`` (after a failed run)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"qemu-model") for a in args[:2]) and str(rundir).encode() in args:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


TARGETS: Final = ("toolstack", "devicemodel", "hypervisor", "xenstored")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m physmap_lab.fuzz",
        description="Fuzz the stack's daemons and parsers over their real interfaces.",
    )
    parser.add_argument(
        "--target", choices=(*TARGETS, "all"), default="all", help="what to fuzz (default: all)"
    )
    parser.add_argument(
        "--frames", type=int, default=100_000, help="xenstore and hypercall frames to send"
    )
    parser.add_argument(
        "--lines", type=int, default=None, help="QMP lines to send (default: frames / 20)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="mutated images through xl-sim restore (default: frames / 20000, 5 to 200); "
        "twenty times as many go through the parser alone",
    )
    parser.add_argument(
        "--qmp-max-nesting",
        type=int,
        default=5000,
        help="deepest JSON nesting sent to QMP (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    targets = TARGETS if args.target == "all" else (args.target,)
    lines = args.lines if args.lines is not None else max(args.frames // 20, 1)
    images = args.images if args.images is not None else min(max(args.frames // 20000, 5), 200)
    print(f"fuzz: seed={seed} targets={','.join(targets)}", flush=True)
    reports = run_targets(
        targets, args.frames, seed, lines=lines, images=images, max_nesting=args.qmp_max_nesting
    )
    for name in targets:
        print(f"{name}: {reports[name].summary()}", flush=True)
    return 0 if all(r.ok for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

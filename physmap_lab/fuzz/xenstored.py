"""Fuzzing xenstored-sim.

Several workers open connections to the privileged socket and to guest sockets at once and send
random and mutated frames: valid requests with damaged payloads, unknown op numbers, random
transaction ids, bad UTF-8, NULs in odd places, truncated headers, lengths over 4096 (the daemon
must drop that connection and only it, as xenstored_core.c does for an oversized header) and
connections closed half-way through a frame.  Meanwhile a well-behaved privileged client and a
well-behaved guest keep doing round trips, each of which must complete within a generous limit.
Afterwards the daemon must still run, must not have logged a traceback, must pass CONTROL
``check``, serve a fresh connection, and its tree (walked by DIRECTORY from ``/``) must agree
with its own per-domain node accounting (CONTROL ``quota <domid>``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Final

import trio

from xenhost import RunDir
from xenstored_sim.client import XsClient, open_xenstore
from xenstored_sim.wire import HEADER, Op, XsError

from ..ready import accepts
from ..stack import terminate
from .generators import FUZZ_DOMIDS, GOOD_DOMID, FrameMaker
from .report import PROGRESS_LIMIT, Budget, FuzzReport

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
    rng: FrameMaker, rundir: Path, socket_path: Path, budget: Budget, report: FuzzReport
) -> None:
    if rng.random() < 0.4:
        path = socket_path
    else:
        path = RunDir(rundir).guest_socket(rng.choice(FUZZ_DOMIDS))
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
    seed: int, rundir: Path, socket_path: Path, budget: Budget, report: FuzzReport
) -> None:
    rng = FrameMaker(seed)
    while budget.left > 0:
        await _one_connection(rng, rundir, socket_path, budget, report)


# Answers a well-behaved guest may legitimately get: a privileged fuzz frame whose path a
# mutation cut short (``RM /local``) removes the guest's home, as it would under C.
_HOME_GONE: Final = frozenset({"ENOENT", "EACCES"})


async def _good_round(xs: XsClient, base: str, i: int, *, home_may_go: bool) -> None:
    with trio.fail_after(PROGRESS_LIMIT):
        try:
            await xs.write(f"{base}/k{i % 5}", str(i))
            if await xs.read(f"{base}/k{i % 5}") != str(i).encode():
                raise AssertionError(f"{base}/k{i % 5} did not read back {i}")
            await xs.directory(base)
        except XsError as exc:
            if not (home_may_go and exc.errno_name in _HOME_GONE):
                raise


async def _good_client(
    path: str, base: str, report: FuzzReport, done: trio.Event, *, home_may_go: bool = False
) -> None:
    """Round trips that must keep completing while the fuzz runs."""
    async with open_xenstore(path) as xs:
        i = 0
        while not done.is_set() or i == 0:
            await _good_round(xs, base, i, home_may_go=home_may_go)
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
    await _wait_for(RunDir(rundir).guest_socket(GOOD_DOMID))


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


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside nested exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


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
    socket_path = socket_path or RunDir(rundir).xenstored_socket
    report = FuzzReport()
    start = time.monotonic()
    await _set_up(socket_path, rundir)
    budget = Budget(frames)
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_good_client, str(socket_path), "/good", report, done)
            guest = str(RunDir(rundir).guest_socket(GOOD_DOMID))
            home = f"/local/domain/{GOOD_DOMID}/g"
            good_guest = partial(_good_client, home_may_go=True)
            nursery.start_soon(good_guest, guest, home, report, done)
            async with trio.open_nursery() as fuzzers:
                for w in range(workers):
                    fuzzers.start_soon(
                        _worker, seed * 1000 + w, rundir, socket_path, budget, report
                    )
            done.set()
    except* trio.TooSlowError:
        report.problems.append(f"a well-behaved request took over {PROGRESS_LIMIT} s")
    except* (XsError, AssertionError, ConnectionError) as group:  # XsDisconnected
        for exc in _leaves(group):
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
            while not accepts(str(RunDir(rundir).xenstored_socket)):
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

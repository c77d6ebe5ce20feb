"""The migration channel: the stream follower (pure), and ``xl-sim migrate`` /
``migrate-receive`` facing bad input and peers that break the protocol (one stack, loopback)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from hypervisor_sim.client import open_hypervisor
from hypervisor_sim.protocol import HypercallError
from physmap_lab.migration import Host, _finish, start_receiver, two_hosts
from physmap_lab.stack import Stack, executable
from toolstack.config import DomainConfig
from toolstack.image import read_image, write_image
from toolstack.memory_stream import read_page_data
from toolstack.migrate import parse_host
from toolstack.migrate_guard import undo
from toolstack.migration_stream import RECEIVER_BANNER, StreamFollower
from toolstack.savefile import read_header
from toolstack.streamio import ImageReader, StreamError
from xenhost import RunDir

XL_SIM = executable("xl-sim")
CONFIG = DomainConfig(name="vm", memory_mib=1, vga="stdvga", dm_mode="compat")


def image_bytes(rng: random.Random) -> bytes:
    """A stream with several PAGE_DATA records, some pfns sent twice (as pre-copy does)."""
    batches = []
    for _ in range(rng.randrange(1, 4)):
        pfns = sorted(rng.sample(range(64), rng.randrange(1, 10)))
        batches.append((pfns, [rng.randbytes(4096 * len(pfns))]))
    pairs = [("physmap/1/start_addr", "f0000000")] if rng.random() < 0.5 else []
    f = io.BytesIO()
    write_image(f, CONFIG, batches, pairs, io.BytesIO(rng.randbytes(rng.randrange(0, 300))))
    return f.getvalue()


@pytest.mark.parametrize("seed", range(30))
def test_the_follower_finds_the_end_in_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    data = image_bytes(rng)
    f = StreamFollower()
    at = 0
    while not f.done:
        n = rng.randrange(1, f.wants() + 1)
        assert at + n <= len(data), "the follower wants more than the stream holds"
        f.feed(data[at : at + n])
        at += n
    assert at == len(data) == f.offset
    assert f.records[0] == "LIBXC_CONTEXT" and f.records[-1] == "END"
    with pytest.raises(StreamError):
        f.feed(b"x")


@pytest.mark.parametrize("seed", range(10))
def test_the_follower_names_the_configuration_and_each_page_record(seed: int) -> None:
    """The receiver builds the domain on ``config`` and loads each ``page_data`` record as it
    completes: every event spans whole bytes that have arrived, in stream order."""
    rng = random.Random(seed)
    data = image_bytes(rng)
    f = StreamFollower()
    events: list[tuple[str, int, int]] = []
    at = 0
    while not f.done:
        n = rng.randrange(1, f.wants() + 1)
        f.feed(data[at : at + n])
        at += n
        for event in f.take_events():
            assert event[2] <= at
            events.append(event)
    assert events[0][0] == "config"
    assert read_header(ImageReader(io.BytesIO(data[: events[0][2]]))).config == CONFIG
    index = read_image(io.BytesIO(data))
    assert index.memory is not None
    pages = [e for e in events if e[0] == "page_data"]
    assert len(pages) == len(index.memory.records) == len(events) - 1
    for (_kind, start, end), want in zip(pages, index.memory.records, strict=True):
        f2 = io.BytesIO(data[:end])
        f2.seek(start)
        assert read_page_data(ImageReader(f2)).data_pfns == want.data_pfns


def test_the_follower_refuses_what_is_not_a_stream() -> None:
    f = StreamFollower()
    with pytest.raises(StreamError, match="bad magic"):
        f.feed(b"\0" * f.wants())


@pytest.mark.parametrize(
    ("lines", "want"),
    [
        ([], None),
        (["domid 4"], 4),
        (["domid 4", "done"], None),
        (["domid 4", "domid 7"], 7),
        (["domid x", "garbage"], None),
        (["done", "domid 9"], 9),
    ],
)
def test_the_guard_undoes_the_last_domain_not_done(lines: list[str], want: int | None) -> None:
    assert undo(lines) == want


def test_parse_host() -> None:
    assert parse_host("127.77.0.2:8002") == ("127.77.0.2", 8002)
    assert parse_host("[::1]:5") == ("::1", 5)
    for bad in ("host", ":5", "h:", "h:x", "h:70000"):
        with pytest.raises(ValueError, match="ADDRESS:PORT"):
            parse_host(bad)


async def test_bad_arguments_and_no_receiver(xl: Any) -> None:
    rc, _, err = await xl.run("migrate", "1", "nohost")
    assert rc == 2 and "ADDRESS:PORT" in err
    made = await xl("create", "--memory", "8", "--vga", "stdvga")
    rc, out, err = await xl.run("migrate", str(made["domid"]), "127.0.0.1:1")
    assert rc == 1 and "cannot reach a receiver at 127.0.0.1:1" in out["error"]
    assert "Traceback" not in err
    rc, out, _ = await xl.run("migrate", "77", "127.0.0.1:1")
    assert rc == 1
    [dom] = (await xl("list"))["domains"]
    assert not dom["paused"]


async def _receiver(stack: Stack) -> tuple[trio.Process, int]:
    proc = await trio.lowlevel.open_process(
        [
            XL_SIM,
            "--rundir", str(stack.rundir), "--json", "migrate-receive",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=stack.env(),
    )  # fmt: skip
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, f"the receiver exited before saying where it listens: {line!r}"
            line += chunk
    return proc, int(line.split(b":")[-1])


@pytest.mark.parametrize(
    "send",
    [b"", b"Xen saved domain, xl format\n \0 \r" + b"\x04\x03\x02\x01" + b"\0" * 5, b"junk" * 20],
)
async def test_a_broken_sender_leaves_the_receiver_clean(
    stack: Stack, xl: Any, send: bytes
) -> None:
    proc, port = await _receiver(stack)
    s = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    with trio.fail_after(30):
        while len(got) < len(RECEIVER_BANNER):
            chunk = await s.receive_some(100)
            assert chunk, f"the receiver hung up after {got!r}"
            got += chunk
    assert got == RECEIVER_BANNER
    await s.send_all(send)
    await s.aclose()
    with trio.fail_after(30):
        await proc.wait()
    assert proc.returncode == 1
    assert proc.stdout is not None and proc.stderr is not None
    out = json.loads((await proc.stdout.receive_some(65536)).decode().strip())
    assert out["error"]
    assert "Traceback" not in (await proc.stderr.receive_some(65536)).decode()
    assert (await xl("list"))["domains"] == []
    assert list((stack.rundir / "migrate").iterdir()) == []


@pytest.mark.parametrize(
    "limit",
    [["--max-rounds", "2"], ["--dirty-threshold", "100000"]],
    ids=["rounds-used-up", "few-pages-left"],
)
async def test_every_page_written_before_the_suspend_arrives(
    tmp_path: Path, limit: list[str]
) -> None:
    """The guest writes random pages throughout the pre-copy; after the migration the
    destination holds the last bytes written to each.  The pages of the look that ends the
    pre-copy (few enough dirty, or the rounds used up) go out before the suspend, as libxc's
    send_memory_live() sends them; dropped, they would arrive with older contents."""
    pages = 16 * 256
    async with two_hosts(tmp_path, tag=f"w{os.getpid() % 10000}", use_netns=False) as hosts:
        src, dst = hosts
        made = await _host_xl(src, "create", "--memory", "16", "--vga", "stdvga")
        domid = int(made["domid"])
        receiver, where = await start_receiver(dst)
        written: dict[int, bytes] = {}
        stop = trio.Event()

        async def write() -> None:
            rng = random.Random(11)
            async with open_hypervisor(RunDir(src.rundir).hypervisor_socket) as hv:
                while not stop.is_set():
                    ops = [
                        {"op": "mem_write", "gpa": rng.randrange(pages) << 12,
                         "data": rng.randbytes(8)}
                        for _ in range(16)
                    ]  # fmt: skip
                    try:
                        await hv.guest(domid, ops)
                    except HypercallError as exc:
                        if exc.errno_name != "EBUSY":  # paused for the suspend, or gone
                            return
                    else:
                        written.update((op["gpa"], op["data"]) for op in ops)
                    await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            # Either way the pre-copy ends after its second round, whose look holds many pages.
            sent = await _host_xl(src, "migrate", str(domid), where, *limit)
            stop.set()
        received = await _finish(receiver)
        assert sent["precopy_rounds"] == 2 and len(written) > 100
        steps = sent["stop_copy_s"]
        assert list(steps) == [
            "suspend",
            "final_look",
            "last_round",
            "tail",
            "destination",
            "handover",
        ]
        assert 0 < sum(steps.values()) <= sent["downtime_s"] + 0.01
        new = int(received["domid"])
        gpas = sorted(written)
        async with open_hypervisor(RunDir(dst.rundir).hypervisor_socket) as hv:
            got = await hv.guest(new, [{"op": "mem_read", "gpa": g, "len": 8} for g in gpas])
        stale = [hex(g) for g, data in zip(gpas, got, strict=True) if data != written[g]]
        assert stale == [], f"{len(stale)} of {len(gpas)} pages arrived stale"
        await _host_xl(dst, "destroy", str(new))


async def _host_xl(h: Host, *args: str) -> dict[str, Any]:
    proc = await trio.run_process(h.xl(*args), capture_stdout=True, check=False)
    out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert proc.returncode == 0, out
    return out

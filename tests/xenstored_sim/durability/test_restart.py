"""``--state-dir`` across a clean restart: nodes, permissions, generations, domains, quotas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from xenstored_sim.cli import config_from_args
from xenstored_sim.client import open_xenstore
from xenstored_sim.server.durable import SyncPolicy
from xenstored_sim.wire import Op, XsError

if TYPE_CHECKING:
    from .conftest import StatefulDaemon


@pytest.mark.parametrize("sync", ["always", "batch", "none"])
async def test_store_survives_sigterm_restart(daemon: StatefulDaemon, sync: str) -> None:
    await daemon.start("--sync", sync)
    async with open_xenstore(daemon.socket) as xs:
        for name in ("zeta", "alpha", "mid"):  # creation order, not sorted
            await xs.write(f"/vm/list/{name}", name.upper())
        await xs.write("/vm/bin", b"\x00\xff\x01")
        await xs.rm("/vm/list/alpha")
        await xs.write("/vm/list/alpha", "again")  # moves to the end
        await xs.set_perms("/vm/list/mid", ["r3", "w4"])
        async with xs.transaction() as t:
            await t.write("/vm/tx/a", "1")
            await t.write("/vm/tx/b", "2")
        await xs.introduce(3, 11, 7)
        await xs.mkdir("/local/domain/3")
        await xs.set_perms("/local/domain/3", ["n3"])
        before = {
            p: await xs.directory_part(p, 0) for p in ("/vm/list", "/vm/tx", "/local/domain/3")
        }
        values = {p: await xs.read(p) for p in ("/vm/list/zeta", "/vm/bin", "/vm/tx/b")}
    assert daemon.stop() == 0
    assert not daemon.guest_socket(3).exists()

    await daemon.start("--sync", sync)
    async with open_xenstore(daemon.socket) as xs:
        assert await xs.directory("/vm/list") == ["zeta", "mid", "alpha"]
        assert {p: await xs.read(p) for p in values} == values
        assert await xs.get_perms("/vm/list/mid") == ["r3", "w4"]
        after = {p: await xs.directory_part(p, 0) for p in before}
        assert after == before
        assert await xs.is_domain_introduced(3)
        # The generation counter goes on from where it stood: a new node is newer.
        await xs.write("/vm/list/new", "x")
        assert int((await xs.directory_part("/vm/list", 0)).generation) > int(
            before["/vm/list"].generation
        )
    await daemon.wait_guest(3)
    async with open_xenstore(daemon.guest_socket(3)) as guest:
        await guest.write("mine", "g")  # relative to /local/domain/3, as domain 3
        assert await guest.get_perms("mine") == ["n3"]
        with pytest.raises(XsError):
            await guest.read("/vm/bin")


async def test_set_target_and_quota_accounting_survive(daemon: StatefulDaemon) -> None:
    await daemon.start("-Q", "nodes=4")
    async with open_xenstore(daemon.socket) as xs:
        await xs.introduce(5, 1, 1)
        await xs.introduce(6, 1, 1)
        await xs.request(Op.SET_TARGET, b"6\x005\x00")
        for d in (5, 6):
            await xs.mkdir(f"/local/domain/{d}")
            await xs.set_perms(f"/local/domain/{d}", [f"n{d}"])
    await daemon.wait_guest(5)
    async with open_xenstore(daemon.guest_socket(5)) as g5:
        await g5.write("a", "1")
        await g5.write("b", "2")  # domain 5 now owns 3 nodes of its 4
    daemon.stop()

    await daemon.start("-Q", "nodes=4")
    await daemon.wait_guest(6)
    async with open_xenstore(daemon.guest_socket(6)) as g6:
        # SET_TARGET came back: domain 6 acts as owner of domain 5's nodes.
        assert await g6.read("/local/domain/5/a") == b"1"
    async with open_xenstore(daemon.guest_socket(5)) as g5:
        await g5.write("c", "3")
        with pytest.raises(XsError) as err:
            await g5.write("d", "4")
        assert err.value.errno_name == "ENOSPC"


async def test_compaction_keeps_everything(daemon: StatefulDaemon) -> None:
    await daemon.start("--journal-max", "2048")
    async with open_xenstore(daemon.socket) as xs:
        for i in range(200):
            await xs.write(f"/c/k{i % 50}", f"v{i}")
        await xs.introduce(9, 1, 1)
        before = await xs.directory_part("/c", 0)
    daemon.stop()
    names = sorted(p.name for p in daemon.state.iterdir())
    assert "snapshot" in names and len([n for n in names if n.startswith("journal.")]) == 1
    assert "journal.0" not in names
    await daemon.start()
    async with open_xenstore(daemon.socket) as xs:
        assert await xs.directory_part("/c", 0) == before
        assert [await xs.read(f"/c/k{i}") for i in range(50)] == [
            f"v{150 + i}".encode() for i in range(50)
        ]
        assert await xs.is_domain_introduced(9)


async def test_torn_tail_is_dropped_and_logged(daemon: StatefulDaemon) -> None:
    await daemon.start()
    async with open_xenstore(daemon.socket) as xs:
        await xs.write("/t/kept", "yes")
    daemon.stop()
    journal = daemon.state / "journal.0"
    size = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # half a frame header of a cut record
    await daemon.start()
    async with open_xenstore(daemon.socket) as xs:
        assert await xs.read("/t/kept") == b"yes"
        await xs.write("/t/after", "1")
    daemon.stop()
    assert "torn tail" in daemon.stderr()
    await daemon.start()
    async with open_xenstore(daemon.socket) as xs:
        assert await xs.read("/t/after") == b"1"
    assert journal.stat().st_size > size


def test_damaged_snapshot_stops_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "snapshot").write_bytes(b"\x10\x00\x00\x00garbage")
    cmd = [sys.executable, "-m", "xenstored_sim", "--rundir", str(tmp_path / "run")]
    proc = subprocess.run(
        [*cmd, "--state-dir", str(state)], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert b"unreadable snapshot" in proc.stderr and b"Traceback" not in proc.stderr


def test_sync_policy_flag() -> None:
    assert config_from_args(["--rundir", "/x"]).sync is SyncPolicy.BATCH
    assert config_from_args(["--rundir", "/x", "--sync", "none"]).sync is SyncPolicy.NONE
    with pytest.raises(SystemExit):
        config_from_args(["--rundir", "/x", "--sync", "sometimes"])

"""The recordable file layer: what it records is what reached the directory."""

from __future__ import annotations

from pathlib import Path

from xenstored_sim.core import ConnKind, XenstoreEngine
from xenstored_sim.core.crashfs import CrashModel, FileOp, parse_log
from xenstored_sim.server.durable import DurableStore, SyncPolicy
from xenstored_sim.server.fileio import FileIO
from xenstored_sim.wire import Op, Packet


def test_replaying_the_record_gives_the_directory(tmp_path: Path) -> None:
    """Changes, two compactions, a restart with a torn tail: at each step the record,
    replayed by the crash model, holds exactly the files on disk."""
    log = tmp_path / "ops.jsonl"
    state = tmp_path / "state"
    io = FileIO(str(log))

    def replayed() -> dict[str, bytes]:
        model = CrashModel()
        for op in parse_log(log.read_bytes()):
            model.apply(op)
        return model.live(str(state))

    def on_disk() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in state.iterdir()}

    engine = XenstoreEngine()
    durable = DurableStore(str(state), engine, SyncPolicy.ALWAYS, 400, io)
    durable.open()
    conn = engine.connect(ConnKind.SOCKET)
    for i in range(30):
        engine.handle(conn, Packet(int(Op.WRITE), i + 1, 0, f"/f/k{i % 7}\0{'v' * i}".encode()))
        durable.record(False)
        if durable.needs_compaction():
            durable.compact()
        assert replayed() == on_disk()
    assert durable.epoch >= 2
    durable.close()
    journal = state / f"journal.{durable.epoch}"
    with open(journal, "ab") as f:
        f.write(b"\x10\x00\x00")  # a torn header
    again = DurableStore(str(state), XenstoreEngine(), SyncPolicy.ALWAYS, 400, io)
    again.open()  # cuts the tail off: the truncation is recorded
    assert replayed() == on_disk()
    assert parse_log(log.read_bytes())[-2:] == [
        FileOp("ftruncate", fd=again._fd, size=journal.stat().st_size),
        FileOp("fsync", fd=again._fd),
    ]
    again.close()

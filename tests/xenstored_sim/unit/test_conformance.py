"""The C xenstored 4.17.7 probe battery as a table, replayed through the pure engine.

Each line of ``data/conformance-cxenstored-4.17.7.jsonl`` is one request of the oracle's probe
with every message it caused (replies and watch events, to every connection, in order).  The
table was checked against the oracle's golden transcript when it was made; see its first line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenstored_sim.core import ConnKind, XenstoreEngine
from xenstored_sim.wire import Packet, PacketDecoder, RemoteProtocolError, encode_unchecked

TABLE = Path(__file__).resolve().parents[1] / "data" / "conformance-cxenstored-4.17.7.jsonl"


def load_steps() -> list[dict]:
    lines = TABLE.read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def test_table_is_the_whole_battery() -> None:
    steps = load_steps()
    assert len([s for s in steps if "op" in s]) > 180
    assert {s["op"] for s in steps if "op" in s} >= set(range(15)) | {17, 18, 19, 20, 21, 22, 99}


def test_probe_battery_replays_identically() -> None:
    engine = XenstoreEngine()
    conns: dict[str, int] = {}

    def conn(name: str) -> int:
        if name not in conns:
            conns[name] = engine.connect(ConnKind.SOCKET)
            assert conns[name] == int(name[1:])  # connection ids are part of the table
        return conns[name]

    for n, step in enumerate(load_steps()):
        cid = conn(step["conn"])
        if step.get("close"):
            engine.disconnect(cid)
            continue
        payload = bytes.fromhex(step["payload"])
        if step.get("dropped"):
            # An oversized header kills the connection before the engine sees it (docs/xenstore.md,
            # 'Wire format').
            decoder = PacketDecoder()
            decoder.receive_data(encode_unchecked(step["op"], 1, step["tx"], payload))
            with pytest.raises(RemoteProtocolError):
                decoder.next_packet()
            engine.disconnect(cid)
            continue
        out = engine.handle(cid, Packet(step["op"], step["req_id"], step["tx"], payload))
        got = [[f"c{c}", p.op, p.req_id, p.tx_id, p.payload.hex()] for c, p in out]
        assert got == step["out"], f"step {n}: {step}"

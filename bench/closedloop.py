"""Closed-loop WRITE+READ benchmark with the command line and output of the oracle's
``xsbench.py``, used when ``../shared/oracle`` is absent.

Each client is a process with one connection and one request outstanding: WRITE a small
value, wait, READ it back, wait, over ``--keys`` keys in turn.  A WRITE+READ pair is 2 ops.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from typing import Any

HDR = struct.Struct("=IIII")
XS_READ, XS_WRITE = 2, 11


def _client(idx: int, path: str, seconds: float, nkeys: int, barrier: Any, out: Any) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    keys = [b"/bench/c%d/k%d" % (idx, i) for i in range(nkeys)]
    value = (b"v%d-" % idx).ljust(8, b"x")[:8]
    buf = bytearray()
    rid = 0

    def call(op: int, payload: bytes) -> None:
        nonlocal rid
        rid += 1
        s.sendall(HDR.pack(op, rid, 0, len(payload)) + payload)
        while True:
            while len(buf) < 16 or len(buf) < 16 + HDR.unpack_from(buf)[3]:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf.extend(chunk)
            _, r, _, ln = HDR.unpack_from(buf)
            del buf[: 16 + ln]
            if r == rid:
                return

    for k in keys:
        call(XS_WRITE, k + b"\0" + value)
    barrier.wait()
    ops = 0
    i = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        call(XS_WRITE, keys[i] + b"\0" + value)
        call(XS_READ, keys[i] + b"\0")
        ops += 2
        i = (i + 1) % nkeys
        if (ops & 63) == 0 and time.perf_counter() >= deadline:
            break
    out.put((ops, time.perf_counter() - t0))
    s.close()


def _cpu(pid: int | None) -> float | None:
    if not pid:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--daemon-pid", type=int)
    args = ap.parse_args()
    rates: list[float] = []
    usops: list[float] = []
    for r in range(args.runs):
        barrier = mp.Barrier(args.clients)
        q: Any = mp.Queue()
        procs = [
            mp.Process(target=_client, args=(i, args.socket, args.seconds, args.keys, barrier, q))
            for i in range(args.clients)
        ]
        for p in procs:
            p.start()
        c0 = _cpu(args.daemon_pid)
        res = [q.get() for _ in procs]
        c1 = _cpu(args.daemon_pid)
        for p in procs:
            p.join()
        ops = sum(o for o, _ in res)
        wall = max(w for _, w in res)
        rates.append(ops / wall)
        extra = ""
        if c0 is not None and c1 is not None:
            usops.append((c1 - c0) * 1e6 / ops)
            extra = f" daemon-cpu={c1 - c0:.2f}s ({usops[-1]:.1f} us/op)"
        print(
            f"run {r + 1}: clients={args.clients} ops={ops} wall={wall:.3f}s "
            f"-> {ops / wall:.0f} ops/s{extra}"
        )
        sys.stdout.flush()
    med = statistics.median(rates)
    extra = f", daemon {statistics.median(usops):.1f} us CPU/op" if usops else ""
    print(f"median: clients={args.clients} {med:.0f} ops/s ({med / 2:.0f} pairs/s){extra}")


if __name__ == "__main__":
    main()

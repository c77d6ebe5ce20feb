"""Seeded scenarios for the random differential run against C xenstored (see ``diffrun.py``).

A scenario is a list of raw requests on 1-3 privileged connections (``p0``..``p2``) and 0-2
guest connections (``g<domid>``, each an unprivileged domain introduced by ``p0`` first).  It
covers every message type of Xen 4.17's ``xs_wire.h``: transactions (conflicting, nested,
finished and unknown ids, requests inside them), watches above, at and below the nodes written,
relative and special ones, DIRECTORY_PART paging, SET_PERMS lists valid and invalid,
INTRODUCE/RELEASE/SET_TARGET/RESUME, malformed payloads and oversized frames.

Pure and deterministic: ``scenario(seed, index)`` is always the same list.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# xs_wire.h message numbers (xenstored_sim.wire.Op, restated so this module stands alone).
CONTROL, DIRECTORY, READ, GET_PERMS, WATCH, UNWATCH = 0, 1, 2, 3, 4, 5
TRANSACTION_START, TRANSACTION_END, INTRODUCE, RELEASE, GET_DOMAIN_PATH = 6, 7, 8, 9, 10
WRITE, MKDIR, RM, SET_PERMS, WATCH_EVENT, ERROR = 11, 12, 13, 14, 15, 16
IS_DOMAIN_INTRODUCED, RESUME, SET_TARGET, RESET_WATCHES, DIRECTORY_PART = 17, 18, 19, 21, 22

OP_NAMES = {
    0: "CONTROL",
    1: "DIRECTORY",
    2: "READ",
    3: "GET_PERMS",
    4: "WATCH",
    5: "UNWATCH",
    6: "TRANSACTION_START",
    7: "TRANSACTION_END",
    8: "INTRODUCE",
    9: "RELEASE",
    10: "GET_DOMAIN_PATH",
    11: "WRITE",
    12: "MKDIR",
    13: "RM",
    14: "SET_PERMS",
    15: "WATCH_EVENT",
    16: "ERROR",
    17: "IS_DOMAIN_INTRODUCED",
    18: "RESUME",
    19: "SET_TARGET",
    21: "RESET_WATCHES",
    22: "DIRECTORY_PART",
}

#: A transaction id taken from the reply to the n-th TRANSACTION_START of the run.
TxRef = str


@dataclass(frozen=True)
class Step:
    """One request: ``tx`` is a literal id or a :data:`TxRef` ``"t<n>"``."""

    conn: str
    op: int
    payload: bytes = b""
    tx: int | TxRef = 0
    oversize: bool = False

    def describe(self) -> str:
        if self.oversize:
            return f"{self.conn} oversized frame (len 4097)"
        name = OP_NAMES.get(self.op, f"OP{self.op}")
        shown = repr(self.payload)
        if len(self.payload) > 80:
            shown = f"{self.payload[:60]!r}... ({len(self.payload)} bytes)"
        return f"{self.conn} {name} tx={self.tx} {shown}"


@dataclass
class Scenario:
    seed: int
    index: int
    conns: list[str]
    guests: list[int]
    steps: list[Step] = field(default_factory=list)
    #: domids that may be introduced: released by the cleanup, targets last.
    domids: list[int] = field(default_factory=list)
    targets: set[int] = field(default_factory=set)
    #: how many steps introduce the guests: their connections open right after
    prologue: int = 0


def c_atoi(text: str) -> int:
    """C atoi() as an unsigned int: a sign and digits, anything else stops it."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) & 0xFFFFFFFF if m else 0


def args(*parts: str | bytes) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


class _Gen:
    def __init__(self, seed: int, index: int) -> None:
        self.rnd = random.Random(f"xsdiff-{seed}-{index}")
        base = 1 + (index * 5) % 32000
        self.domids = [base + k for k in range(5)]
        nguests = self.rnd.choice((0, 0, 1, 1, 2))
        self.guests = self.domids[:nguests]
        nprivs = self.rnd.choice((1, 2, 2, 3))
        self.conns = [f"p{i}" for i in range(nprivs)] + [f"g{d}" for d in self.guests]
        self.tx_count = 0
        self.tx_of: dict[str, list[str]] = {c: [] for c in self.conns}
        self.targets: set[int] = set()
        self.steps: list[Step] = []

    # -- vocabulary --------------------------------------------------------------------
    def path(self, conn: str) -> str:
        r = self.rnd.random()
        if conn.startswith("g") and r < 0.35:
            return self.rnd.choice(("h", "h/x", "h/x/y", "data", "", "h/")) or "h"
        if r < 0.07:
            return self.rnd.choice(("@introduceDomain", "@releaseDomain", "@other"))
        if r < 0.14:
            return self.rnd.choice(
                (
                    "/s/a/",
                    "/s//a",
                    "/s/a b",
                    "/s/a.b",
                    "/",
                    "/tool",
                    "r/",
                    "/p",
                    "/d",
                    "/" + "q" * 2050,
                )
            )
        if r < 0.24:
            return self.rnd.choice(("r", "r/x", "r/x/y"))
        if r < 0.28:  # long names: directories whose listing needs DIRECTORY_PART paging
            n = self.rnd.choice((1, 2, 3, 5, 8, 13))
            return "/p/" + "n" * self.rnd.choice((200, 400, 700)) + str(n)
        if r < 0.30:
            return "/d/" + "/".join(
                "x" * self.rnd.randint(1, 9) for _ in range(self.rnd.randint(1, 300))
            )
        if r < 0.32 and self.guests:
            d = self.rnd.choice(self.guests)
            return self.rnd.choice(
                (f"/local/domain/{d}", f"/local/domain/{d}/h", f"/local/domain/{d}/h/x")
            )
        return self.rnd.choice(
            ("/s", "/s/a", "/s/a/b", "/s/a/b/c", "/s/b", "/s/b/x", "/s/c", "/s/c/d/e", "/local")
        )

    def domid(self) -> str:
        r = self.rnd.random()
        if r < 0.6:
            return str(self.rnd.choice(self.domids))
        return self.rnd.choice(
            ("0", "32752", "32753", "x", "", "-1", "7", str(self.domids[0] + 5), "0x10", " 3")
        )

    def perms(self) -> list[str]:
        n = self.rnd.choice((0, 1, 1, 2, 2, 3, 4, 6))
        out = []
        for _ in range(n):
            letter = self.rnd.choice("nrwbnrwbx")
            who = self.rnd.choice(("0", *map(str, self.domids), "99999", "", "3x"))
            out.append(letter + who)
        return out

    def value(self) -> bytes:
        return self.rnd.choice(
            (
                b"",
                b"v",
                b"value-1",
                b"\x00\x01\xff",
                b"x" * 100,
                b"y" * self.rnd.randint(4000, 4095),
            )
        )

    def tx_for(self, conn: str) -> int | TxRef:
        r = self.rnd.random()
        mine = self.tx_of[conn]
        if mine and r < 0.35:
            return self.rnd.choice(mine[-3:])
        if r < 0.38:
            return self.rnd.choice((12345, 1, 2))
        if r < 0.40 and self.tx_count:
            return f"t{self.rnd.randrange(self.tx_count)}"
        return 0

    # -- steps -------------------------------------------------------------------------
    def add(self, conn: str, op: int, payload: bytes, tx: int | TxRef = 0) -> None:
        if self.rnd.random() < 0.06:
            payload = self.mangle(payload)
        self.steps.append(Step(conn, op, payload, tx))

    def mangle(self, payload: bytes) -> bytes:
        kind = self.rnd.randrange(5)
        if kind == 0:
            return payload[:-1] if payload.endswith(b"\0") else payload + b"\0"
        if kind == 1:
            return b""
        if kind == 2:
            return payload + b"\xffjunk\0"
        if kind == 3:
            return payload.replace(b"\0", b"", 1)
        return b"\0" + payload

    def step(self) -> None:
        conn = self.rnd.choice(self.conns)
        ops = (
            (WRITE, 14),
            (READ, 9),
            (DIRECTORY, 5),
            (DIRECTORY_PART, 5),
            (MKDIR, 5),
            (RM, 7),
            (GET_PERMS, 4),
            (SET_PERMS, 8),
            (WATCH, 7),
            (UNWATCH, 4),
            (TRANSACTION_START, 6),
            (TRANSACTION_END, 7),
            (RESET_WATCHES, 1),
            (INTRODUCE, 2),
            (RELEASE, 1),
            (SET_TARGET, 2),
            (RESUME, 1),
            (IS_DOMAIN_INTRODUCED, 1),
            (GET_DOMAIN_PATH, 1),
            (CONTROL, 1),
            (-1, 2),
        )
        op = self.rnd.choices([o for o, _ in ops], [w for _, w in ops])[0]
        getattr(self, f"op_{op}" if op >= 0 else "op_odd")(conn)

    def op_11(self, conn: str) -> None:
        self.add(conn, WRITE, self.path(conn).encode() + b"\0" + self.value(), self.tx_for(conn))

    def _one_path(self, op: int) -> None:
        conn = self.rnd.choice(self.conns)
        self.add(conn, op, args(self.path(conn)), self.tx_for(conn))

    def op_2(self, conn: str) -> None:
        self.add(conn, READ, args(self.path(conn)), self.tx_for(conn))

    def op_1(self, conn: str) -> None:
        self.add(conn, DIRECTORY, args(self.path(conn)), self.tx_for(conn))

    def op_12(self, conn: str) -> None:
        self.add(conn, MKDIR, args(self.path(conn)), self.tx_for(conn))

    def op_13(self, conn: str) -> None:
        self.add(conn, RM, args(self.path(conn)), self.tx_for(conn))

    def op_3(self, conn: str) -> None:
        self.add(conn, GET_PERMS, args(self.path(conn)), self.tx_for(conn))

    def op_22(self, conn: str) -> None:
        offset = self.rnd.choice(
            ("0", "0", "1", "2", "4", "6", "100", "x", None, "-1", "705", "1404", "2000", "4000")
        )
        parts = [self.path(conn)] + ([offset] if offset is not None else [])
        self.add(conn, DIRECTORY_PART, args(*parts), self.tx_for(conn))

    def op_14(self, conn: str) -> None:
        self.add(conn, SET_PERMS, args(self.path(conn), *self.perms()), self.tx_for(conn))

    def op_4(self, conn: str) -> None:
        token = self.rnd.choice(("t1", "t2", "tok"))
        parts = [self.path(conn)] + ([token] if self.rnd.random() < 0.95 else [])
        self.add(conn, WATCH, args(*parts), self.tx_for(conn) if self.rnd.random() < 0.2 else 0)

    def op_5(self, conn: str) -> None:
        token = self.rnd.choice(("t1", "t2", "tok"))
        self.add(conn, UNWATCH, args(self.path(conn), token))

    def op_6(self, conn: str) -> None:
        tx = self.tx_for(conn) if self.rnd.random() < 0.15 else 0
        self.add(conn, TRANSACTION_START, self.rnd.choice((b"\0", b"", b"x\0")), tx)
        ref = f"t{self.tx_count}"
        self.tx_count += 1
        self.tx_of[conn].append(ref)

    def op_7(self, conn: str) -> None:
        payload = self.rnd.choice((b"T\0", b"T\0", b"F\0", b"T", b"", b"\0", b"X\0", b"TT\0"))
        mine = self.tx_of[conn]
        tx = self.rnd.choice(mine[-2:]) if mine and self.rnd.random() < 0.8 else self.tx_for(conn)
        self.steps.append(Step(conn, TRANSACTION_END, payload, tx))

    def op_21(self, conn: str) -> None:
        self.add(conn, RESET_WATCHES, b"", self.tx_for(conn) if self.rnd.random() < 0.2 else 0)

    def op_8(self, conn: str) -> None:
        mfn = self.rnd.choice(("1", "1", "0", "x"))
        port = self.rnd.choice(("1", "3", "0", "-1"))
        parts = [self.domid(), mfn, port][: self.rnd.choice((3, 3, 3, 2))]
        self.add(conn, INTRODUCE, args(*parts))

    def op_9(self, conn: str) -> None:
        d = self.domid()
        if c_atoi(d) in self.targets:
            d = "0"  # C 4.17 frees a SET_TARGET target's domain too early (use after free)
        self.add(conn, RELEASE, args(d))

    def op_19(self, conn: str) -> None:
        a, b = self.domid(), self.domid()
        self.targets.update((c_atoi(a), c_atoi(b)))
        self.add(conn, SET_TARGET, args(a, b))

    def op_18(self, conn: str) -> None:
        self.add(conn, RESUME, args(self.domid()))

    def op_17(self, conn: str) -> None:
        self.add(conn, IS_DOMAIN_INTRODUCED, args(self.domid()))

    def op_10(self, conn: str) -> None:
        self.add(conn, GET_DOMAIN_PATH, args(self.domid()))

    def op_0(self, conn: str) -> None:
        cmd = self.rnd.choice((("print", "hello"), ("nosuch",), ("quota",), ("log", "x")))
        self.add(conn, CONTROL, args(*cmd))

    def op_odd(self, conn: str) -> None:
        kind = self.rnd.randrange(3)
        if kind == 0 and conn.startswith("p"):
            self.steps.append(Step(conn, WRITE, b"", 0, oversize=True))
        else:
            op = self.rnd.choice((15, 16, 20, 23, 99))
            self.add(conn, op, args(self.path(conn)))

    def prologue(self) -> None:
        """Introduce the guests and give each a home of its own, then a watch or two."""
        for d in self.guests:
            self.steps.append(Step("p0", INTRODUCE, args(str(d), "1", "1")))
            home = f"/local/domain/{d}"
            self.steps.append(Step("p0", WRITE, args(home + "/h") + b"", 0))
            self.steps.append(Step("p0", SET_PERMS, args(home, f"n{d}"), 0))
            self.steps.append(Step("p0", SET_PERMS, args(home + "/h", f"n{d}"), 0))
        if self.rnd.random() < 0.5:
            self.steps.append(Step("p0", SET_PERMS, args("/s", "n0", *self.perms()[:2])))


def scenario(seed: int, index: int) -> Scenario:
    gen = _Gen(seed, index)
    gen.prologue()
    prologue = len(gen.steps)
    for _ in range(gen.rnd.randint(10, 60)):
        gen.step()
    return Scenario(
        seed, index, gen.conns, gen.guests, gen.steps, gen.domids, gen.targets, prologue
    )

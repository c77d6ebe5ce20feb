"""A stateful property test of the pure engine against a small reference model.

The model is a dict tree with C 4.17's permission rules (docs/xenstore.md, 'Permissions'): three
connections (the privileged socket and guests 1 and 2) send random requests, and after every
step the engine's tree, permissions, watch events, transaction results and node accounting
must agree with the model.  Where C's answer depends on details the model does not track, the
rule accepts the possible answers and then checks the tree is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xenstored_sim.core import ConnKind, XenstoreEngine
from xenstored_sim.wire import Op, Packet

READ, WRITE = 1, 2
MASK = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}

Perms = tuple[tuple[str, int], ...]


@dataclass
class MNode:
    value: bytes
    perms: Perms
    children: list[str] = field(default_factory=list)


def parent(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def name(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def is_under(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (the watch match of docs/xenstore.md, 'Watches')."""
    return top == "/" or path == top or path.startswith(top + "/")


class Model:
    """The store as C 4.17 defines it, without quotas (the tests stay far below them)."""

    def __init__(self) -> None:
        n0: Perms = (("n", 0),)
        self.nodes: dict[str, MNode] = {
            "/": MNode(b"", n0, ["tool"]),
            "/tool": MNode(b"", n0, ["xenstored"]),
            "/tool/xenstored": MNode(b"", n0),
        }

    def copy(self) -> Model:
        m = Model()
        m.nodes = {p: MNode(n.value, n.perms, list(n.children)) for p, n in self.nodes.items()}
        return m

    @staticmethod
    def perm(domid: int | None, perms: Perms) -> int:
        """C ``perm_for_conn`` (docs/xenstore.md, 'Permissions'); ``None`` is the privileged
        socket."""
        if domid is None or perms[0][1] == domid:
            return READ | WRITE
        for letter, who in perms[1:]:
            if who == domid:
                return MASK[letter]
        return MASK[perms[0][0]]

    def ancestor(self, path: str) -> MNode:
        while path not in self.nodes:
            path = parent(path)
        return self.nodes[path]

    def access(self, domid: int | None, path: str, need: int) -> str:
        """OK, EACCES, or ENOENT (a missing node whose nearest ancestor grants ``need``)."""
        node = self.nodes.get(path)
        if node is not None:
            return "OK" if self.perm(domid, node.perms) & need else "EACCES"
        return "ENOENT" if self.perm(domid, self.ancestor(path).perms) & need else "EACCES"

    def can_read(self, domid: int | None, path: str) -> bool:
        node = self.nodes.get(path)
        return node is not None and bool(self.perm(domid, node.perms) & READ)

    def create(self, domid: int | None, path: str, value: bytes) -> None:
        """Create ``path`` and its missing parents (docs/xenstore.md, 'New nodes')."""
        missing = []
        p = path
        while p not in self.nodes:
            missing.append(p)
            p = parent(p)
        for p in reversed(missing):
            perms = self.nodes[parent(p)].perms
            if domid is not None:
                perms = ((perms[0][0], domid), *perms[1:])
            self.nodes[p] = MNode(b"", perms)
            self.nodes[parent(p)].children.append(name(p))
        self.nodes[path].value = value

    def remove(self, path: str) -> None:
        for p in [p for p in self.nodes if is_under(p, path)]:
            del self.nodes[p]
        self.nodes[parent(path)].children.remove(name(path))

    def owned(self, domid: int) -> int:
        return sum(1 for n in self.nodes.values() if n.perms[0][1] == domid)


# Privileged socket = None, guests by domid.
CONNS = [None, 1, 2]
PATHS = [
    "/a",
    "/a/b",
    "/a/b/c",
    "/b",
    "/local/domain/1",
    "/local/domain/1/x",
    "/local/domain/1/x/y",
    "/local/domain/2",
    "/local/domain/2/x",
    "/local/domain/2/x/y",
]
PERMS: list[Perms] = [
    (("n", 0),),
    (("r", 0),),
    (("n", 0), ("b", 1)),
    (("n", 0), ("r", 2), ("w", 1)),
    (("n", 1),),
    (("r", 1), ("b", 2)),
    (("n", 2),),
    (("b", 2), ("n", 1)),
]
TOKENS = ["t1", "t2"]
WATCH_PATHS = ["/", "/a", "/a/b", "/local", "/local/domain/1", "/local/domain/2/x"]

conns = st.sampled_from(CONNS)
paths = st.sampled_from(PATHS)
values = st.sampled_from([b"", b"v", b"value-2"])


def perms_payload(perms: Perms) -> bytes:
    return b"".join(f"{letter}{who}".encode() + b"\0" for letter, who in perms)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = XenstoreEngine(clock=lambda: 0.0)
        self.model = Model()
        self.conn_ids: dict[int | None, int] = {None: self.engine.connect(ConnKind.SOCKET)}
        self.req_id = 0
        self.watches: dict[int | None, set[tuple[str, str]]] = {c: set() for c in CONNS}
        for domid in (1, 2):
            self.ok(None, Op.INTRODUCE, b"%d\x001\x001\0" % domid)
            self.conn_ids[domid] = self.engine.connect(ConnKind.GUEST, domid)
            home = f"/local/domain/{domid}"
            self.ok(None, Op.WRITE, home.encode() + b"\0")
            self.model.create(None, home, b"")
            self.ok(None, Op.SET_PERMS, home.encode() + b"\0" + perms_payload((("n", domid),)))
            self.model.nodes[home].perms = (("n", domid),)

    # -- driving the engine ---------------------------------------------------------

    def send(
        self, who: int | None, op: Op, payload: bytes, tx: int = 0
    ) -> tuple[str, bytes, dict[int | None, list[tuple[str, str]]]]:
        """(result, reply payload, events per connection) of one request."""
        self.req_id += 1
        cid = self.conn_ids[who]
        out = self.engine.handle(cid, Packet(int(op), self.req_id, tx, payload))
        by_id = {v: k for k, v in self.conn_ids.items()}
        events: dict[int | None, list[tuple[str, str]]] = {c: [] for c in CONNS}
        reply: Packet | None = None
        for target, pkt in out:
            if pkt.op == Op.WATCH_EVENT:
                wpath, token = pkt.payload.split(b"\0")[:2]
                events[by_id[target]].append((wpath.decode(), token.decode()))
            else:
                assert target == cid and reply is None
                reply = pkt
        assert reply is not None
        if reply.op == Op.ERROR:
            return reply.payload.rstrip(b"\0").decode(), b"", events
        assert reply.op == op
        return "OK", reply.payload, events

    def ok(self, who: int | None, op: Op, payload: bytes, tx: int = 0) -> bytes:
        result, body, _ = self.send(who, op, payload, tx)
        assert result == "OK", (op, payload, result)
        return body

    def expected_events(
        self, path: str, readable: dict[int | None, bool]
    ) -> dict[int | None, list[tuple[str, str]]]:
        return {
            c: sorted((path, t) for w, t in self.watches[c] if is_under(path, w) and readable[c])
            for c in CONNS
        }

    def readable(self, model: Model, path: str) -> dict[int | None, bool]:
        """The XSA-115 filter (docs/xenstore.md, 'Watches'): the path or its parent is readable."""
        return {c: model.can_read(c, path) or model.can_read(c, parent(path)) for c in CONNS}

    # -- rules -----------------------------------------------------------------------

    @rule(who=conns, path=paths, value=values)
    def write(self, who: int | None, path: str, value: bytes) -> None:
        expect = self.model.access(who, path, WRITE)
        result, _, events = self.send(who, Op.WRITE, path.encode() + b"\0" + value)
        assert result == ("EACCES" if expect == "EACCES" else "OK")
        if result == "OK":
            self.model.create(who, path, value)
            want = self.expected_events(path, self.readable(self.model, path))
        else:
            want = {c: [] for c in CONNS}
        assert {c: sorted(e) for c, e in events.items()} == want

    @rule(who=conns, path=paths)
    def mkdir(self, who: int | None, path: str) -> None:
        expect = self.model.access(who, path, WRITE)
        existed = path in self.model.nodes
        result, _, events = self.send(who, Op.MKDIR, path.encode() + b"\0")
        assert result == ("EACCES" if expect == "EACCES" else "OK")
        if result == "OK" and not existed:
            self.model.create(who, path, b"")
            want = self.expected_events(path, self.readable(self.model, path))
        else:
            want = {c: [] for c in CONNS}
        assert {c: sorted(e) for c, e in events.items()} == want

    @rule(who=conns, path=paths)
    def rm(self, who: int | None, path: str) -> None:
        before = self.model.copy()
        result, _, events = self.send(who, Op.RM, path.encode() + b"\0")
        if path in self.model.nodes:
            expect = self.model.access(who, path, WRITE)
            assert result == expect
            if result == "OK":
                self.model.remove(path)
                # The privileged socket sees everything: the top's event for watches on it
                # and its ancestors, and exact events on removed descendants (docs/xenstore.md,
                # 'Watches').
                want = sorted(
                    (path, t) if is_under(path, w) else (w, t)
                    for w, t in self.watches[None]
                    if is_under(path, w) or (is_under(w, path) and w in before.nodes)
                )
                assert sorted(events[None]) == want
        else:
            assert result in ("OK", "ENOENT", "EACCES")
            assert not any(events.values())

    @rule(who=conns, path=paths)
    def read(self, who: int | None, path: str) -> None:
        result, body, _ = self.send(who, Op.READ, path.encode() + b"\0")
        assert result == self.model.access(who, path, READ)
        if result == "OK":
            assert body == self.model.nodes[path].value

    @rule(who=conns, path=paths)
    def directory(self, who: int | None, path: str) -> None:
        result, body, _ = self.send(who, Op.DIRECTORY, path.encode() + b"\0")
        assert result == self.model.access(who, path, READ)
        if result == "OK":
            assert body.split(b"\0")[:-1] == [c.encode() for c in self.model.nodes[path].children]

    @rule(who=conns, path=paths, perms=st.sampled_from(PERMS))
    def set_perms(self, who: int | None, path: str, perms: Perms) -> None:
        result, _, events = self.send(
            who, Op.SET_PERMS, path.encode() + b"\0" + perms_payload(perms)
        )
        node = self.model.nodes.get(path)
        if node is None:
            assert result in ("ENOENT", "EACCES")
            return
        owner = node.perms[0][1]
        if who is None:
            expect = "OK"
        elif owner != who:
            expect = "EACCES"
        elif perms[0][1] != who:
            expect = "EPERM"
        else:
            expect = "OK"
        assert result == expect
        if result == "OK":
            old = self.readable(self.model, path)
            node.perms = perms
            new = self.readable(self.model, path)
            either = {c: old[c] or new[c] for c in CONNS}
            assert {c: sorted(e) for c, e in events.items()} == self.expected_events(path, either)
        else:
            assert not any(events.values())

    @rule(who=conns, wpath=st.sampled_from(WATCH_PATHS), token=st.sampled_from(TOKENS))
    def watch(self, who: int | None, wpath: str, token: str) -> None:
        result, _, events = self.send(who, Op.WATCH, f"{wpath}\0{token}\0".encode())
        if (wpath, token) in self.watches[who]:
            assert result == "EEXIST"
            return
        assert result == "OK"
        assert events[who] == [(wpath, token)]  # the initial event (docs/xenstore.md, 'Watches')
        self.watches[who].add((wpath, token))

    @rule(who=conns, wpath=st.sampled_from(WATCH_PATHS), token=st.sampled_from(TOKENS))
    def unwatch(self, who: int | None, wpath: str, token: str) -> None:
        result, _, _ = self.send(who, Op.UNWATCH, f"{wpath}\0{token}\0".encode())
        if (wpath, token) in self.watches[who]:
            assert result == "OK"
            self.watches[who].discard((wpath, token))
        else:
            assert result == "ENOENT"

    @rule(
        who=conns,
        ops=st.lists(st.tuples(st.booleans(), paths, values), min_size=1, max_size=5),
        commit=st.booleans(),
        interfere=st.booleans(),
    )
    def transaction(
        self,
        who: int | None,
        ops: list[tuple[bool, str, bytes]],
        commit: bool,
        interfere: bool,
    ) -> None:
        """Writes and removals in a transaction: invisible until commit; a write by someone
        else to a node the transaction already wrote makes the commit fail with EAGAIN
        (docs/xenstore.md, 'Transactions')."""
        tx = int(self.ok(who, Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        inside = self.model.copy()
        written: list[str] = []
        for remove, path, value in ops:
            if remove:
                if path not in inside.nodes:
                    continue  # C's answer for a missing node depends on its parents
                expect = inside.access(who, path, WRITE)
                result, _, events = self.send(who, Op.RM, path.encode() + b"\0", tx)
                assert result == expect
                if result == "OK":
                    inside.remove(path)
            else:
                expect = inside.access(who, path, WRITE)
                result, _, events = self.send(who, Op.WRITE, path.encode() + b"\0" + value, tx)
                assert result == ("EACCES" if expect == "EACCES" else "OK")
                if result == "OK":
                    inside.create(who, path, value)
                    written.append(path)
            # nothing fires before commit (docs/xenstore.md, 'Watches')
            assert not any(events.values())
            # Outside the transaction nothing changed.
            assert self.tree() == self.model_tree(self.model)
        conflict = interfere and bool(written)
        if conflict:
            target = written[0]
            self.ok(None, Op.WRITE, target.encode() + b"\0interfere")
            self.model.create(None, target, b"interfere")
        result, _, _ = self.send(who, Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        if not commit:
            assert result == "OK"
        elif conflict:
            assert result == "EAGAIN"
        else:
            assert result == "OK"
            self.model = inside
        assert self.send(who, Op.TRANSACTION_END, b"F\0", tx)[0] == "ENOENT"

    # -- invariants ------------------------------------------------------------------

    def tree(self) -> dict[str, tuple[bytes, bytes, list[bytes]]]:
        """The engine's tree as the privileged socket sees it, walked by DIRECTORY."""
        out = {}
        stack = ["/"]
        while stack:
            path = stack.pop()
            names = self.ok(None, Op.DIRECTORY, path.encode() + b"\0").split(b"\0")[:-1]
            value = self.ok(None, Op.READ, path.encode() + b"\0")
            perms = self.ok(None, Op.GET_PERMS, path.encode() + b"\0")
            out[path] = (value, perms, names)
            stack.extend(("" if path == "/" else path) + "/" + n.decode() for n in names)
        return out

    @staticmethod
    def model_tree(model: Model) -> dict[str, tuple[bytes, bytes, list[bytes]]]:
        return {
            p: (n.value, perms_payload(n.perms), [c.encode() for c in n.children])
            for p, n in model.nodes.items()
        }

    @invariant()
    def same_tree(self) -> None:
        assert self.tree() == self.model_tree(self.model)

    @invariant()
    def consistent(self) -> None:
        assert self.engine.check() == []
        for path in self.engine.store.nodes:
            if path != "/":
                assert parent(path) in self.engine.store.nodes

    @invariant()
    def accounting(self) -> None:
        store = self.engine.store
        for domid in (0, 1, 2):
            counted = sum(1 for n in store.nodes.values() if n.perms[0][1] == domid)
            assert store.owned.get(domid, 0) == counted
            assert counted == self.model.owned(domid)
        for domid in (1, 2):
            assert self.engine.domain_usage(domid)["nodes"] == self.model.owned(domid)
            assert self.engine.domain_usage(domid)["watches"] == len(self.watches[domid])
            # memory (C 4.17 accounting): owned nodes, watches, private transaction copies
            engine = self.engine
            expect = sum(
                n.size() + len(p) for p, n in store.nodes.items() if n.perms[0][1] == domid
            )
            assert store.memory.get(domid, 0) == expect
            for conn in engine.conns.values():
                if conn.domid != domid:
                    continue
                watches = engine.watches.of_conn(conn.id)
                assert conn.watch_mem == sum(len(w.path) + len(w.token) for w in watches)
                expect += conn.watch_mem
                for txn in conn.transactions.values():
                    copies = sum(
                        n.size() + len(p) + txn.key_extra
                        for p, n in txn.nodes.items()
                        if n is not None
                    )
                    assert txn.memory == copies
                    expect += copies
            assert engine.domain_usage(domid)["memory"] == expect


EngineMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_against_model = EngineMachine.TestCase

"""Property tests against simple models: path validation and the store as a dict."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from xenstored_sim.core import ConnKind, XenstoreEngine, XsErrno
from xenstored_sim.core.paths import canonicalize
from xenstored_sim.wire import Op, Packet

# The model: xenstore.txt's character set, segments separated by single slashes.
SEGMENT = r"[A-Za-z0-9_@-]+"
MODEL_ABS = re.compile(rf"/(?:{SEGMENT}(?:/{SEGMENT})*)?")
MODEL_REL = re.compile(rf"{SEGMENT}(?:/{SEGMENT})*")

path_bytes = st.binary(max_size=40) | st.lists(
    st.sampled_from([b"/", b"a", b"Z", b"0", b"-", b"_", b"@", b".", b" ", b"//", b"\x7f"]),
    max_size=12,
).map(b"".join)


@given(path_bytes)
def test_canonicalize_agrees_with_the_model(raw: bytes) -> None:
    text = raw.decode("latin-1")
    if raw.startswith(b"@"):
        expected = None
    elif raw.startswith(b"/"):
        expected = text if MODEL_ABS.fullmatch(text) else None
    else:
        expected = "/local/domain/7/" + text if MODEL_REL.fullmatch(text) else None
    try:
        got: str | None = canonicalize(raw, "/local/domain/7", 2048)
    except XsErrno as exc:
        assert exc.errno_name == "EINVAL"
        got = None
    assert got == expected


@given(st.integers(0, 3000), st.booleans())
def test_path_max_counts_only_after_the_domain_prefix(n: int, local: bool) -> None:
    raw = (b"/local/domain/12345/" if local else b"/") + b"x" * n
    counted = n if local else n + 1
    try:
        canonicalize(raw, "/local/domain/0", 2048)
        ok = True
    except XsErrno:
        ok = False
    if local:
        assert ok == (0 < n <= 2048)
    else:
        assert ok == (counted <= 2048)


names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=4).map(lambda parts: "/m/" + "/".join(parts))
ops = st.lists(
    st.tuples(st.sampled_from(["write", "rm", "mkdir"]), paths, st.binary(max_size=3)),
    max_size=40,
)


@settings(max_examples=60)
@given(ops)
def test_store_matches_a_dict_model(script: list[tuple[str, str, bytes]]) -> None:
    engine = XenstoreEngine()
    conn = engine.connect(ConnKind.SOCKET)
    model: dict[str, bytes] = {"/m": b""}
    engine.handle(conn, Packet(Op.MKDIR, 1, 0, b"/m\0"))

    def ancestors(path: str) -> list[str]:
        parts = path.split("/")[1:]
        return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]

    for op, path, value in script:
        raw = path.encode()
        if op == "write":
            engine.handle(conn, Packet(Op.WRITE, 1, 0, raw + b"\0" + value))
            for a in ancestors(path):
                model.setdefault(a, b"")
            model[path] = value
        elif op == "mkdir":
            engine.handle(conn, Packet(Op.MKDIR, 1, 0, raw + b"\0"))
            for a in [*ancestors(path), path]:
                model.setdefault(a, b"")
        else:
            engine.handle(conn, Packet(Op.RM, 1, 0, raw + b"\0"))
            for p in [p for p in model if p == path or p.startswith(path + "/")]:
                del model[p]
    stored = {p: n.value for p, n in engine.store.nodes.items() if p == "/m" or p.startswith("/m/")}
    assert stored == model
    assert engine.check() == []
    # the owner counts follow every create and delete
    assert engine.store.owned[0] == len(engine.store.nodes)

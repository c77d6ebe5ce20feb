"""The crash-state model: what fsync of a file and of a directory guarantee, and nothing more."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from xenstored_sim.core.crashfs import (
    SECTOR,
    CrashModel,
    FileOp,
    _Write,
    explore,
    ops_before,
    parse_log,
    torn,
)

D = "/s"


def opn(name: str, fd: int, trunc: bool = False) -> FileOp:
    return FileOp("open", fd=fd, path=f"{D}/{name}", creat=True, trunc=trunc)


def wr(fd: int, off: int, data: bytes) -> FileOp:
    return FileOp("write", fd=fd, off=off, data=data)


def fsync(fd: int) -> FileOp:
    return FileOp("fsync", fd=fd)


DSYNC = FileOp("fsync_dir", path=D)


def states_at_end(ops: list[FileOp]) -> set[tuple[tuple[str, bytes], ...]]:
    model = CrashModel()
    for op in ops:
        model.apply(op)
    return {s.files for s in model.states(D)}


def test_fsynced_data_and_name_survive_every_crash() -> None:
    ops = [opn("j", 3), DSYNC, wr(3, 0, b"abc"), fsync(3)]
    assert states_at_end(ops) == {(("j", b"abc"),)}


def test_fsync_of_a_file_does_not_make_its_name_durable() -> None:
    ops = [opn("j", 3), wr(3, 0, b"abc"), fsync(3)]
    assert states_at_end(ops) == {(), (("j", b"abc"),)}


def test_directory_fsync_does_not_make_data_durable() -> None:
    ops = [opn("j", 3), wr(3, 0, b"abcd"), DSYNC]
    assert states_at_end(ops) == {(("j", c),) for c in (b"", b"ab", b"abcd")}


def test_unsynced_appends_may_be_lost_torn_or_overtaken() -> None:
    ops = [opn("j", 3), DSYNC, wr(3, 0, b"aa"), fsync(3), wr(3, 2, b"bbbb"), wr(3, 6, b"cc")]
    contents = {dict(s)["j"] for s in states_at_end(ops)}
    assert b"aa" in contents  # both lost
    assert b"aabbbbcc" in contents  # both there
    assert b"aabb" in contents  # the first torn half-way
    assert b"aa\0\0\0\0cc" in contents  # the second overtook the first: a hole of zeros
    assert all(c.startswith(b"aa") for c in contents)  # the synced part never goes


def test_rename_without_directory_fsync_may_not_have_happened() -> None:
    ops = [
        opn("new", 3),
        wr(3, 0, b"N"),
        fsync(3),
        FileOp("rename", src=f"{D}/new", dst=f"{D}/snap"),
    ]
    old = [opn("snap", 4), wr(4, 0, b"O"), fsync(4), FileOp("close", fd=4), DSYNC]
    got = states_at_end(old + ops)
    assert (("snap", b"O"),) in got  # neither the creation nor the rename persisted
    assert (("new", b"N"), ("snap", b"O")) in got  # created, not renamed
    assert (("snap", b"N"),) in got
    # Atomic: the destination always holds the old or the new file.
    assert all(dict(s).get("snap") in (b"O", b"N") for s in got)
    assert states_at_end([*old, *ops, DSYNC]) == {(("snap", b"N"),)}


def test_rename_before_the_data_is_synced_may_leave_an_empty_file() -> None:
    ops = [opn("tmp", 3), wr(3, 0, b"state"), FileOp("rename", src=f"{D}/tmp", dst=f"{D}/snap")]
    assert (("snap", b""),) in states_at_end([*ops, DSYNC])


def test_unlink_without_directory_fsync_may_leave_the_file() -> None:
    ops = [opn("old", 3), wr(3, 0, b"x"), fsync(3), DSYNC, FileOp("unlink", path=f"{D}/old")]
    assert states_at_end(ops) == {(), (("old", b"x"),)}


def test_truncation_is_a_pending_change_of_the_file() -> None:
    ops = [opn("j", 3), DSYNC, wr(3, 0, b"abcdef"), fsync(3), FileOp("ftruncate", fd=3, size=2)]
    assert {dict(s)["j"] for s in states_at_end(ops)} == {b"abcdef", b"ab"}
    assert {dict(s)["j"] for s in states_at_end([*ops, fsync(3)])} == {b"ab"}


def test_open_with_truncation_of_a_durable_file() -> None:
    ops = [opn("j", 3), DSYNC, wr(3, 0, b"abc"), fsync(3), FileOp("close", fd=3), opn("j", 4, True)]
    assert {dict(s)["j"] for s in states_at_end(ops)} == {b"abc", b""}


def test_torn_writes_are_cut_at_sectors_and_half_way() -> None:
    w = _Write(SECTOR - 10, bytes(3 * SECTOR))
    cuts = [len(t.data) for t in torn(w)]
    assert min(cuts) > 0 and max(cuts) < len(w.data) and len(cuts) <= 3
    assert 10 in cuts  # the first sector boundary
    assert [len(t.data) for t in torn(_Write(0, b"ab"))] == [1]
    assert torn(_Write(0, b"a")) == []


def test_many_pending_writes_fall_back_to_prefixes_and_omissions() -> None:
    ops = [opn("j", 3), DSYNC] + [wr(3, i, b"x") for i in range(40)]
    contents = {dict(s)["j"] for s in states_at_end(ops)}
    assert {b"x" * i for i in range(41)} <= contents
    assert b"\0" + b"x" * 39 in contents
    assert len(contents) < 200


def test_mkdir_makes_a_directory_that_needs_its_parent_fsynced() -> None:
    ops = [
        FileOp("mkdir", path=f"{D}/sub"),
        FileOp("open", fd=3, path=f"{D}/sub/f", creat=True),
        FileOp("fsync_dir", path=f"{D}/sub"),
        fsync(3),
    ]
    model = CrashModel()
    for op in ops:
        model.apply(op)
    got = {(s.dirs, s.files) for s in model.states(D)}
    assert got == {((), ()), (("sub",), (("sub/f", b""),))}


def test_log_parsing_and_positions() -> None:
    lines = [
        {"op": "open", "path": f"{D}/j", "fd": 3, "creat": True, "trunc": False, "append": True},
        {"op": "write", "fd": 3, "off": 0, "data": b"hi".hex()},
        {"op": "fsync", "fd": 3},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines).encode()
    ops = parse_log(text + b'{"op": "wri')  # a cut last line is ignored
    assert [o.op for o in ops] == ["open", "write", "fsync"] and ops[1].data == b"hi"
    assert ops_before(text, len(text)) == 3 and ops_before(text, 5) == 0
    points = {s.point for s in explore(ops, D)}
    assert points == {0, 1, 2, 3}


# ------------------------------------------------------------------ properties

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 1), st.binary(min_size=1, max_size=700)),
    st.tuples(st.just("fsync"), st.integers(0, 1), st.just(b"")),
    st.tuples(st.just("trunc"), st.integers(0, 1), st.just(b"")),
    st.tuples(st.just("dsync"), st.just(0), st.just(b"")),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=10))
def test_every_state_keeps_what_was_synced_and_the_live_view_is_one(
    script: list[tuple[str, int, bytes]],
) -> None:
    """Random writes and syncs on two files: the live contents are a possible state, and a
    file whose name and data were synced (nothing since) has that content in every state."""
    model = CrashModel()
    live = {0: b"", 1: b""}
    for fd in (0, 1):
        model.apply(opn(f"f{fd}", fd))
    model.apply(DSYNC)
    clean = {0: True, 1: True}
    for kind, fd, data in script:
        if kind == "write":
            model.apply(wr(fd, len(live[fd]), data))
            live[fd] += data
            clean[fd] = False
        elif kind == "trunc":
            model.apply(FileOp("ftruncate", fd=fd, size=len(live[fd]) // 2))
            live[fd] = live[fd][: len(live[fd]) // 2]
            clean[fd] = False
        elif kind == "fsync":
            model.apply(fsync(fd))
            clean[fd] = True
        else:
            model.apply(DSYNC)
    got = [dict(s.files) for s in model.states(D)]
    assert {f"f{fd}": live[fd] for fd in live} in got
    for fd in (0, 1):
        if clean[fd]:
            assert all(s[f"f{fd}"] == live[fd] for s in got)

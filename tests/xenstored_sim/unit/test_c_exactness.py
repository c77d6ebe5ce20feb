"""Cases where the random differential run against C xenstored 4.17 found xenstored-sim
answering differently; each test names the C function whose order of checks it follows
(tools/xenstore/xenstored_*.c at RELEASE-4.17.7).  No oracle needed."""

from __future__ import annotations

import pytest

from xenstored_sim.wire import Op


# -- do_transaction_end(): the argument is checked before the missing transaction -------
@pytest.mark.parametrize("payload", [b"T", b"", b"\0", b"X\0", b"TT\0", b"T\0F\0"])
def test_transaction_end_argument_before_lookup(h, payload: bytes) -> None:
    p = h.socket()
    assert h.req(p, Op.TRANSACTION_END, payload) == "EINVAL"


def test_transaction_end_unknown_id_and_tx0(h) -> None:
    p = h.socket()
    # transaction_lookup() in process_message() comes first for a non-zero id
    assert h.req(p, Op.TRANSACTION_END, b"X\0", tx=999) == "ENOENT"
    assert h.req(p, Op.TRANSACTION_END, b"T\0") == "ENOENT"
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.TRANSACTION_END, b"X\0", tx=tx) == "EINVAL"  # stays open
    assert h.req(p, Op.TRANSACTION_END, b"F\0", tx=tx) == b"OK\0"


# -- get_node() -> errno_from_parents() -> ask_parents(): failed lookups read parents ----
def test_missing_node_in_transaction_conflicts_with_a_change_of_its_parent(h) -> None:
    p = h.socket()
    h.req(p, Op.WRITE, b"/s/x\0v")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.DIRECTORY_PART, b"/s/a/b\x001\0", tx=tx) == "ENOENT"
    h.req(p, Op.WRITE, b"/s/b\0v")  # outside: /s gets a new child
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx=tx) == "EAGAIN"


def test_forbidden_node_in_transaction_reads_parents_too(h) -> None:
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    h.req(p, Op.WRITE, b"/s/x\0v")
    h.req(p, Op.SET_PERMS, b"/s\0n0\0r3\0")
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(g, Op.READ, b"/s/x\0", tx=tx) == "EACCES"
    h.req(p, Op.WRITE, b"/s/y\0v")
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx=tx) == "EAGAIN"


def test_parent_granting_any_asked_right_keeps_enoent(h) -> None:
    """errno_from_parents(): ``parent_perm & perm``, any bit of WRITE|OWNER will do."""
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    h.req(p, Op.WRITE, b"/w\0")
    h.req(p, Op.SET_PERMS, b"/w\0n0\0w3\0")
    assert h.req(g, Op.SET_PERMS, b"/w/none\0n3\0") == "ENOENT"
    h.req(p, Op.SET_PERMS, b"/w\0n0\0")
    assert h.req(g, Op.SET_PERMS, b"/w/none\0n3\0") == "EACCES"


# -- do_watch() / check_watch_path() / do_unwatch() ----------------------------------------
@pytest.mark.parametrize("path", [b"r/", b"/a b", b"/s//a", b"h/", b"/x."])
def test_unwatch_does_not_validate_the_path(h, path: bytes) -> None:
    p = h.socket()
    assert h.req(p, Op.UNWATCH, path + b"\0tok\0") == "ENOENT"


def test_watch_arguments(h) -> None:
    p = h.socket()
    assert h.req(p, Op.WATCH, b"rel\0tok\0junk") == b"OK\0"  # the tail has no NUL
    assert h.req(p, Op.UNWATCH, b"rel\0tok\0") == b"OK\0"
    assert h.req(p, Op.WATCH, b"/a\0t\0x\0") == "EINVAL"  # three strings
    assert h.req(p, Op.WATCH, b"@any thing.\0t\0") == b"OK\0"  # @: only the length counts
    assert h.req(p, Op.WATCH, b"@" + b"x" * 2048 + b"\0t\0") == "EINVAL"
    assert h.req(p, Op.UNWATCH, b"@any thing.\0t\0") == b"OK\0"


def test_duplicate_watch_is_eexist_before_the_quota(make_harness) -> None:
    from xenstored_sim.core import Quotas

    h = make_harness(Quotas(watches=1))
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    assert h.req(g, Op.WATCH, b"a\0t\0") == b"OK\0"
    assert h.req(g, Op.WATCH, b"b\0t\0") == b"OK\0"
    assert h.req(g, Op.WATCH, b"a\0t\0") == "EEXIST"
    assert h.req(g, Op.WATCH, b"c\0t\0") == "E2BIG"


# -- do_set_perms(): count, quota, parse, owner's existence, then the node ------------------
def test_set_perms_order_of_checks(h) -> None:
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    h.req(p, Op.WRITE, b"/a\0v")
    assert h.req(p, Op.SET_PERMS, b"/a\0n0") == "EINVAL"  # one NUL: one string
    assert h.req(p, Op.SET_PERMS, b"/a\0n0\0r5") == b"OK\0"  # the tail is ignored
    assert h.req(p, Op.GET_PERMS, b"/a\0") == b"n0\0"
    assert h.req(p, Op.SET_PERMS, b"/none\0x5\0") == "EINVAL"  # parse before lookup
    assert h.req(p, Op.SET_PERMS, b"/a\0n99999\0") == "ENOENT"  # owner does not exist
    assert h.req(g, Op.SET_PERMS, b"/a\0w99999\0") == "ENOENT"  # ... before EACCES
    assert h.req(g, Op.SET_PERMS, b"/a\0n3\0x\0x\0x\0x\0x\0") == "ENOSPC"  # quota first
    assert h.req(p, Op.SET_PERMS, b"/a\0n0\0r-1\0r 5\0r99999\0r0x10\0") == b"OK\0"
    assert h.req(p, Op.GET_PERMS, b"/a\0") == b"n0\0r-1\0r5\0r99999\0r16\0"


def test_acl_entry_for_a_domain_that_does_not_exist_grants_nothing(h) -> None:
    """domain_alloc_permrefs() marks it XS_PERM_IGNORE: listed, but ignored."""
    p = h.socket()
    h.req(p, Op.WRITE, b"/a\0v")
    assert h.req(p, Op.SET_PERMS, b"/a\0n0\0r40000\0") == b"OK\0"
    h.introduce(p, 40000)
    assert h.req(h.guest(40000), Op.READ, b"/a\0") == "EACCES"


# -- do_introduce(), do_set_target(), onearg_domain(): unsigned ids, get_strings() ---------
def test_domain_ids_are_unsigned(h) -> None:
    p = h.socket()
    assert h.req(p, Op.INTRODUCE, b"7\x001\x00-1\0") == b"OK\0"  # port 0xffffffff
    assert h.req(p, Op.INTRODUCE, b"70000\x001\x001\0") == b"OK\0"
    assert h.req(p, Op.INTRODUCE, b"-1\x001\x001\0") == b"OK\0"
    assert h.req(p, Op.IS_DOMAIN_INTRODUCED, b"-1\0") == b"T\0"
    assert h.req(p, Op.RELEASE, b"4294967295\0") == b"OK\0"
    assert h.req(p, Op.INTRODUCE, b"8\x001\x000\0") == "EINVAL"


def test_set_target_arguments(h) -> None:
    p = h.socket()
    h.introduce(p, 5)
    assert h.req(p, Op.SET_TARGET, b"0\x000\0") == b"OK\0"  # dom0 is always connected
    assert h.req(p, Op.SET_TARGET, b"x\0\0") == b"OK\0"
    assert h.req(p, Op.SET_TARGET, b"5\x005") == "EINVAL"  # one terminated string
    assert h.req(p, Op.SET_TARGET, b"6\x005\0") == "ENOENT"


# -- do_control(), send_directory_part() ---------------------------------------------------
def test_control_argument_counts(h) -> None:
    p = h.socket()
    assert h.req(p, Op.CONTROL, b"print\0a\0b\0") == "EINVAL"
    assert h.req(p, Op.CONTROL, b"print\0a\0tail") == b"OK\0"
    assert h.req(p, Op.CONTROL, b"check\0x\0") == "EINVAL"
    assert h.req(p, Op.CONTROL, b"print") == "EINVAL"


def test_dom0_quota_report_counts_socket_watches_and_transactions(h) -> None:
    """add_watch() and transaction copies charge conn->id 0 for the sockets."""
    p = h.socket()

    def memory() -> int:
        report = h.req(p, Op.CONTROL, b"quota\x000\0").decode()
        return int(report.split("memory")[1].split(":")[1].strip(" \n\0"))

    before = memory()
    h.req(p, Op.WATCH, b"/a\0tok\0")
    assert memory() == before + 5
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(p, Op.READ, b"/tool\0", tx=tx)
    assert memory() > before + 5


def test_directory_part_offsets(h) -> None:
    p = h.socket()
    head = h.req(p, Op.DIRECTORY_PART, b"/\x000\0").split(b"\0")[0]
    assert h.req(p, Op.DIRECTORY_PART, b"/\x00-1\0") == head + b"\0\0"  # past the end
    assert h.req(p, Op.DIRECTORY_PART, b"/\x000\0tail") == head + b"\0tool\0\0"
    assert h.req(p, Op.DIRECTORY_PART, b"/\x000\0x\0") == "EINVAL"


# -- rm_node() / walk_node_tree() inside a transaction -------------------------------------
def test_rm_in_transaction_of_a_child_removed_outside_is_eio(h) -> None:
    p = h.socket()
    for path in (b"/a/b/x", b"/a/c", b"/a/d"):
        h.req(p, Op.WRITE, path + b"\0v")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.DIRECTORY, b"/a\0", tx=tx) == b"b\0c\0d\0"
    h.req(p, Op.RM, b"/a/c\0")  # outside, after the transaction copied /a
    assert h.req(p, Op.RM, b"/a\0", tx=tx) == "EIO"
    # the walk stopped at c: b (done before) is gone, /a and d stay, the tx is not failed
    assert h.req(p, Op.DIRECTORY, b"/a\0", tx=tx) == b"c\0d\0"
    assert h.req(p, Op.READ, b"/a/b\0", tx=tx) == "ENOENT"
    assert h.req(p, Op.READ, b"/a/d\0", tx=tx) == b"v"
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx=tx) == "EAGAIN"


def test_rm_in_transaction_without_the_parent_is_einval(h) -> None:
    p = h.socket()
    h.req(p, Op.WRITE, b"/q/x\0v")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.READ, b"/q/r\0", tx=tx) == "ENOENT"  # /q/r: missing for the tx
    h.req(p, Op.WRITE, b"/q/r/s\0v")  # outside
    assert h.req(p, Op.READ, b"/q/r/s\0", tx=tx) == b"v"  # first seen now: copied
    assert h.req(p, Op.RM, b"/q/r/s\0", tx=tx) == "EINVAL"


# -- finalize_transaction(): events in the order the nodes were first accessed -------------
def test_commit_fires_in_first_access_order(h) -> None:
    p, w = h.socket(), h.socket()
    h.req(p, Op.WRITE, b"/q\0")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(p, Op.READ, b"/q\0", tx=tx)
    h.req(p, Op.WRITE, b"/z\0v", tx=tx)
    h.req(p, Op.WRITE, b"/q\0v", tx=tx)
    h.req(p, Op.WRITE, b"/z/y\0v", tx=tx)
    h.out(w, Op.WATCH, b"/\0all\0")
    out = h.out(p, Op.TRANSACTION_END, b"T\0", tx=tx)
    events = [m[2] for m in out if m[0] == w]
    assert events == [b"/q\0all\0", b"/z\0all\0", b"/z/y\0all\0"]


def test_commit_writes_in_first_access_order(h) -> None:
    """finalize_transaction(): the modified nodes take their generations in the order of
    trans->accessed, so a parent read before its new child was created comes first."""
    p = h.socket()
    h.req(p, Op.WRITE, b"/q\0")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    h.req(p, Op.READ, b"/q\0", tx=tx)
    h.req(p, Op.WRITE, b"/q/x\0v", tx=tx)  # writes /q/x, then /q
    assert h.req(p, Op.TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"

    def gen(path: bytes) -> int:
        return int(h.req(p, Op.DIRECTORY_PART, path + b"\x000\0").split(b"\0")[0])

    assert gen(b"/q") + 1 == gen(b"/q/x")


# -- write_node(): access_node() takes the generation before the quota refuses ---------------
def test_refused_writes_use_generations_as_c(h) -> None:
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    h.req(p, Op.WRITE, b"/local/domain/3/h\0")
    h.req(p, Op.SET_PERMS, b"/local/domain/3/h\0n3\0")
    store = h.engine.store
    before = store.generation
    assert h.req(g, Op.WRITE, b"h/new\0" + b"y" * 4000) == "ENOSPC"  # create_node(): leaf
    assert store.generation == before + 1
    h.req(g, Op.WRITE, b"h/x\0v")
    before = store.generation
    assert h.req(g, Op.WRITE, b"h/x\0" + b"y" * 4000) == "ENOSPC"  # an existing node
    assert store.generation == before + 1


def test_quota_refusals_before_any_write_leave_the_transaction_intact(h) -> None:
    """do_set_perms()'s perms quota and create_node()'s node quota return ENOSPC without
    fail_transaction(): the commit still succeeds."""
    p = h.socket()
    h.introduce(p, 3)
    g = h.guest(3)
    h.req(p, Op.WRITE, b"/local/domain/3/h\0")
    h.req(p, Op.SET_PERMS, b"/local/domain/3/h\0n3\0")
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    many = b"h\0" + b"".join(b"r%d\0" % d for d in range(6))
    assert h.req(g, Op.SET_PERMS, many, tx=tx) == "ENOSPC"
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx=tx) == b"OK\0"


def test_rm_in_transaction_of_a_node_its_parent_copy_does_not_list_is_eio(h) -> None:
    """delete_child(): the subtree goes, the parent's entry is not found: EIO."""
    p = h.socket()
    h.req(p, Op.WRITE, b"/s\0")
    tx = int(h.req(p, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(p, Op.DIRECTORY, b"/s\0", tx=tx) == b""  # /s copied, no children
    h.req(p, Op.WRITE, b"/s/b\0v")  # outside
    assert h.req(p, Op.READ, b"/s/b\0", tx=tx) == b"v"
    assert h.req(p, Op.RM, b"/s/b\0", tx=tx) == "EIO"
    assert h.req(p, Op.READ, b"/s/b\0", tx=tx) == "ENOENT"

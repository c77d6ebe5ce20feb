"""Quotas of unprivileged domains and XS_CONTROL replies, as C 4.17.7 gave them."""

from __future__ import annotations

from xenstored_sim.core import Quotas
from xenstored_sim.wire import Op


def guest_home(h, domid: int = 6) -> tuple[int, int]:
    p = h.socket()
    h.introduce(p, domid)
    g = h.guest(domid)
    h.req(p, Op.MKDIR, b"/local/domain/%d\0" % domid)
    h.req(p, Op.SET_PERMS, b"/local/domain/%d\0n%d\0" % (domid, domid))
    return p, g


def test_node_quota_counts_owned_nodes_and_leaves_nothing_behind(make_harness) -> None:
    h = make_harness(Quotas(nodes=5))
    p, g = guest_home(h)
    assert [h.req(g, Op.WRITE, b"n%d\0v" % i) for i in range(6)] == [b"OK\0"] * 4 + ["ENOSPC"] * 2
    assert h.req(g, Op.WRITE, b"n0\0changed") == b"OK\0"  # no new node
    assert h.req(g, Op.RM, b"n0\0") == b"OK\0"
    assert h.req(g, Op.WRITE, b"deep/a/b\0v") == "ENOSPC"  # XSA-414: all or nothing
    assert h.req(g, Op.READ, b"deep\0") == "ENOENT"
    assert h.req(g, Op.WRITE, b"deep\0v") == b"OK\0"
    assert h.req(p, Op.WRITE, b"/local/domain/6/by-dom0\0v") == b"OK\0"  # dom0 is exempt


def test_node_size_quota_boundary(h) -> None:
    _, g = guest_home(h)
    # 24-byte header + 8 per perm + value: 4.17 fails at >= 2048
    assert h.req(g, Op.WRITE, b"big\0" + b"v" * 2015) == b"OK\0"
    assert h.req(g, Op.WRITE, b"big\0" + b"v" * 2016) == "ENOSPC"
    assert h.req(g, Op.WRITE, b"big2\0" + b"v" * 2025) == "ENOSPC"


def test_watch_and_transaction_quotas(h) -> None:
    _, g = guest_home(h)
    answers = [h.req(g, Op.WATCH, b"w%d\0t\0" % i) for i in range(131)]
    assert answers[:129] == [b"OK\0"] * 129 and answers[129:] == ["E2BIG"] * 2
    assert h.req(g, Op.RESET_WATCHES) == b"OK\0"
    answers = [h.req(g, Op.TRANSACTION_START, b"\0") for _ in range(12)]
    assert answers[:11] == [b"%d\0" % i for i in range(1, 12)] and answers[11] == "ENOSPC"
    assert h.req(g, Op.RESET_WATCHES) == b"OK\0"  # drops the transactions too
    assert h.req(g, Op.TRANSACTION_START, b"\0") == b"12\0"
    assert h.req(g, Op.READ, b"x\0", tx=1) == "ENOENT"
    assert h.req(g, Op.WATCH, b"x\0y\0", tx=999) == b"OK\0"
    assert h.req(g, Op.UNWATCH, b"x\0y\0", tx=999) == b"OK\0"


def test_transaction_nodes_quota_fails_the_commit(make_harness) -> None:
    h = make_harness(Quotas(transaction_nodes=3))
    _p, g = guest_home(h)
    for i in (1, 2, 3):
        h.req(g, Op.WRITE, b"n%d\0v" % i)
    h.req(g, Op.WRITE, b"deep\0v")
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    assert [h.req(g, Op.READ, b"n%d\0" % i, tx) for i in (1, 2, 3)] == [b"v"] * 3
    assert h.req(g, Op.READ, b"deep\0", tx) == "ENOSPC"
    assert h.req(g, Op.READ, b"n1\0", tx) == b"v"
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx) == "ENOMEM"
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(g, Op.WRITE, b"q1\0x", tx) == b"OK\0"
    assert h.req(g, Op.WRITE, b"q2/a/b\0x", tx) == "ENOSPC"
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx) == "ENOMEM"
    assert h.req(g, Op.READ, b"q1\0") == "ENOENT"


def test_control_replies(h) -> None:
    p = h.socket()
    quota = h.req(p, Op.CONTROL, b"quota\0")
    assert quota == (
        b"Quota settings:\n"
        b"nodes            :     1000 Nodes per domain\n"
        b"watches          :      128 Watches per domain\n"
        b"transactions     :       10 Transactions per domain\n"
        b"outstanding      :       20 Outstanding requests per domain\n"
        b"transaction-nodes:     1024 Max. number of accessed nodes per transaction\n"
        b"memory           :  2621440 Total Xenstore memory per domain (error level)\n"
        b"node-size        :     2048 Max. size of a node\n"
        b"path-max         :     2048 Max. length of a node path\n"
        b"permissions      :        5 Max. number of permissions per node\n\0"
    )
    assert h.req(p, Op.CONTROL, b"quota-soft\0") == (
        b"Quota settings:\n"
        b"memory           :  2097152 Total Xenstore memory per domain (warning level)\n\0"
    )
    assert h.req(p, Op.CONTROL, b"quota\x000\0") == (
        b"Domain 0:\nnodes           :        3\nwatches         :        0\n"
        b"transactions    :        0\noutstanding     :        0\nmemory          :      132\n\0"
    )
    assert h.req(p, Op.CONTROL, b"quota\x005\0") == "ENOENT"
    assert h.req(p, Op.CONTROL, b"quota\0set\0nodes\x005\0") == b"OK\0"
    assert b"nodes            :        5 Nodes" in h.req(p, Op.CONTROL, b"quota\0")
    for bad in (
        b"quota\0set\0nodes\0",
        b"quota\0set\0nodes\x000\0",
        b"quota\0set\0bogus\x003\0",
        b"log\0",
        b"log\0+io\0",
        b"print\0",
        b"",
        b"\0",
        b"help",
        b"nosuchcmd\0",
    ):
        assert h.req(p, Op.CONTROL, bad) == "EINVAL", bad
    for good in (b"check\0", b"print\0hello\0", b"log\0on\0", b"log\0off\0"):
        assert h.req(p, Op.CONTROL, good) == b"OK\0"
    helptext = h.req(p, Op.CONTROL, b"help\0")
    assert helptext.startswith(b"check\t\nlog\ton|off\n") and helptext.endswith(b"help\t\n\0")


def test_domain_usage_counts_nodes_and_watch_memory(h) -> None:
    p, g = guest_home(h)
    assert b"nodes           :        1\n" in h.req(p, Op.CONTROL, b"quota\x006\0")
    assert b"memory          :       47\n" in h.req(p, Op.CONTROL, b"quota\x006\0")
    for i in range(4):
        h.req(g, Op.WRITE, b"n%d\0v" % i)
    assert b"memory          :      263\n" in h.req(p, Op.CONTROL, b"quota\x006\0")


def test_control_is_audited_with_its_arguments(h) -> None:
    p = h.socket()
    h.engine.take_audit()
    h.req(p, Op.CONTROL, b"print\0marker\0")
    (rec,) = h.engine.take_audit()
    assert rec["op"] == "CONTROL" and rec["args"] == ["print", "marker"] and "path" not in rec

"""The ``memory`` quota of C 4.17 (docs/xenstore.md, 'Quotas'), figures as the C oracle gave them
with ``-Q memory=3000``: nodes are charged record + path, watches path + token, transaction
copies record + "<generation>/<path>"; a node write over the quota is EIO, a watch ENOMEM."""

from __future__ import annotations

import logging

import pytest

from xenstored_sim.cli import config_from_args
from xenstored_sim.core import Quotas
from xenstored_sim.wire import Op


def guest_home(h, domid: int = 6) -> tuple[int, int]:
    p = h.socket()
    h.introduce(p, domid)
    g = h.guest(domid)
    h.req(p, Op.MKDIR, b"/local/domain/%d\0" % domid)
    h.req(p, Op.SET_PERMS, b"/local/domain/%d\0n%d\0" % (domid, domid))
    return p, g


def memory(h, domid: int = 6) -> int:
    return h.engine.domain_usage(domid)["memory"]


def test_nodes_and_watches_are_charged_as_c_does(h) -> None:
    _p, g = guest_home(h)
    assert memory(h) == 47  # 24 header + 8 perm + 15 path: C 4.17.7 reports 47 too
    assert h.req(g, Op.WRITE, b"a\0" + b"v" * 10) == b"OK\0"
    assert memory(h) == 108  # +59 node, +2 for "a\0" in the parent (oracle: 108)
    assert h.req(g, Op.WATCH, b"a\0tok\0") == b"OK\0"
    assert memory(h) == 128  # canonical path (17) + token (3) (oracle: 128)
    assert h.req(g, Op.UNWATCH, b"a\0tok\0") == b"OK\0"
    assert h.req(g, Op.RM, b"a\0") == b"OK\0"
    assert memory(h) == 47


def test_write_over_the_hard_quota_is_eio_and_changes_nothing(make_harness) -> None:
    h = make_harness(Quotas(memory=3000))
    _p, g = guest_home(h, 7)
    assert h.req(g, Op.WRITE, b"y\0" + b"v" * 1000) == b"OK\0"
    assert memory(h, 7) == 1098
    # 1098 + 1902 reaches 3000: C fails at usage >= quota (oracle: EIO, 1098 unchanged)
    assert h.req(g, Op.WRITE, b"x\0" + b"v" * 1851) == "EIO"
    assert memory(h, 7) == 1098 and h.req(g, Op.READ, b"x\0") == "ENOENT"
    assert h.req(g, Op.WRITE, b"x\0" + b"v" * 1850) == b"OK\0"
    assert memory(h, 7) == 2999
    assert h.req(g, Op.WRITE, b"x\0" + b"v" * 1851) == "EIO"  # growing an existing node
    assert h.req(g, Op.READ, b"x\0") == "ENOMEM"  # a 1850-byte reply does not fit either
    assert h.req(g, Op.WRITE, b"x\0" + b"v" * 10) == b"OK\0"  # shrinking is always fine
    assert memory(h, 7) == 1159
    assert h.req(g, Op.RM, b"x\0") == b"OK\0"
    assert h.req(g, Op.RM, b"y\0") == b"OK\0"
    assert memory(h, 7) == 47


def test_watch_over_the_quota_is_enomem(make_harness) -> None:
    h = make_harness(Quotas(memory=3000))
    p, g = guest_home(h, 9)
    assert h.req(g, Op.WRITE, b"y\0" + b"v" * 1900) == b"OK\0"
    assert h.req(g, Op.WRITE, b"z\0" + b"v" * 900) == b"OK\0"
    assert memory(h, 9) == 2949
    assert h.req(g, Op.WATCH, b"/" + b"w" * 100 + b"\0" + b"t" * 10 + b"\0") == "ENOMEM"
    assert h.req(g, Op.DIRECTORY, b"/local/domain/9\0") == b"y\0z\0"  # small replies pass
    assert memory(h, 9) == 2949
    # dom0 is never refused, even when it writes into the guest's nodes' neighbourhood
    assert h.req(p, Op.WRITE, b"/big\0" + b"v" * 4000) == b"OK\0"


def test_transaction_copies_are_charged_until_the_transaction_ends(make_harness) -> None:
    h = make_harness(Quotas(memory=3000))
    _p, g = guest_home(h, 10)
    base = memory(h, 10)
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    gen_len = h.engine.conns[g].transactions[tx].key_extra
    assert memory(h, 10) == base
    assert h.req(g, Op.WRITE, b"a\0" + b"v" * 100, tx) == b"OK\0"
    # the new node (132 + key) and the parent's copy (34 + key), keys "<gen>/<path>"
    assert memory(h, 10) == base + 132 + 18 + gen_len + 34 + 16 + gen_len
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx) == b"OK\0"
    assert memory(h, 10) == base + 150 + 2
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(g, Op.READ, b"a\0", tx) == b"v" * 100  # a read takes a private copy too
    assert memory(h, 10) == base + 152 + 150 + h.engine.conns[g].transactions[tx].key_extra
    assert h.req(g, Op.TRANSACTION_END, b"F\0", tx) == b"OK\0"
    assert memory(h, 10) == base + 152
    # a write over the quota inside a transaction fails it (commit: ENOMEM, as C)
    tx = int(h.req(g, Op.TRANSACTION_START, b"\0")[:-1])
    assert h.req(g, Op.WRITE, b"c\0" + b"v" * 1900, tx) == b"OK\0"
    assert h.req(g, Op.WRITE, b"d\0" + b"v" * 1900, tx) == "EIO"
    assert h.req(g, Op.TRANSACTION_END, b"T\0", tx) == "ENOMEM"
    assert memory(h, 10) == base + 152
    assert h.req(g, Op.READ, b"c\0") == "ENOENT"


def test_release_and_disconnect_return_everything(make_harness) -> None:
    h = make_harness(Quotas(memory=3000))
    p, g = guest_home(h, 6)
    h.req(g, Op.WRITE, b"a/b/c\0xyz")
    h.req(g, Op.WATCH, b"a\0t\0")
    h.req(g, Op.TRANSACTION_START, b"\0")
    h.req(g, Op.READ, b"a/b\0", 1)
    assert memory(h) > 47
    h.engine.disconnect(g)
    assert memory(h) == h.engine.store.memory[6]
    assert h.req(p, Op.RELEASE, b"6\0") == b"OK\0"
    assert 6 not in h.engine.store.memory
    # a node given to a guest by dom0 is charged to it, and returns on a change of owner
    h.introduce(p, 8)
    h.req(p, Op.WRITE, b"/given\0" + b"v" * 50)
    h.req(p, Op.SET_PERMS, b"/given\0n8\0")
    assert h.engine.store.memory[8] == 24 + 8 + 50 + 6
    h.req(p, Op.SET_PERMS, b"/given\0n0\0r8\0")
    assert h.engine.store.memory[8] == 0


def test_soft_quota_logs_a_warning(make_harness, caplog: pytest.LogCaptureFixture) -> None:
    h = make_harness(Quotas(memory=3000, soft_memory=1000))
    _p, g = guest_home(h, 6)
    with caplog.at_level(logging.WARNING, logger="xenstored_sim"):
        assert h.req(g, Op.WRITE, b"a\0" + b"v" * 500) == b"OK\0"
        assert not caplog.records
        assert h.req(g, Op.WRITE, b"b\0" + b"v" * 500) == b"OK\0"  # over 1000: only a warning
    assert [r.getMessage() for r in caplog.records] == ["Domain 6 exceeds soft memory quota"]


def test_quota_report_shows_the_memory(h) -> None:
    p, g = guest_home(h, 6)
    h.req(g, Op.WRITE, b"a\0" + b"v" * 10)
    assert h.req(p, Op.CONTROL, b"quota\x006\0") == (
        b"Domain 6:\nnodes           :        2\nwatches         :        0\n"
        b"transactions    :        0\noutstanding     :        0\nmemory          :      108\n\0"
    )


def test_command_line_spells_the_flags_as_c_4_17() -> None:
    config = config_from_args(["-Q", "memory=9000", "-q", "memory=8000", "-w", "watch-event=1"])
    assert (config.quotas.memory, config.quotas.soft_memory) == (9000, 8000)
    assert config.watch_event_timeout == 1.0
    long = config_from_args(["--quota-soft", "memory=7", "--timeout", "watch-event=0"])
    assert (long.quotas.soft_memory, long.watch_event_timeout) == (7, 0.0)
    assert config_from_args([]).watch_event_timeout == 20.0
    for bad in (["-q", "nodes=5"], ["-w", "bogus=3"], ["-w", "watch-event"]):
        with pytest.raises(SystemExit):
            config_from_args(bad)

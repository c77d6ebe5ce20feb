"""C xenstored's command line (cf. tools/xenstore/xenstored_core.c: options[], usage()): a
harness that starts C can start xenstored-sim with the same flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from xenstored_sim.wire import Op

TRACE_LINE = re.compile(r"(IN|OUT) 0x[0-9a-f]+ \d{8} \d\d:\d\d:\d\d ([A-Z_*]+) \((.*)\)")


def test_c_flags_pid_file_and_trace(start_daemon, tmp_path: Path) -> None:
    pid_file = tmp_path / "xenstored.pid"
    trace = tmp_path / "trace"
    flags = ["-N", "-F", str(pid_file), "-T", str(trace), "-V", "-D", "-R", "-I", "off"]
    flags += ["--event", "3", "--master-domid", "0", "--priv-domid", "0", "-U"]
    daemon = start_daemon(*flags)
    conn = daemon.conn()
    assert conn.req(Op.WRITE, b"/a\0v v") == b"OK\0"
    assert conn.req(Op.READ, b"/nope\0") == "ENOENT"
    assert pid_file.read_text() == f"{daemon.proc.pid}\n"  # C write_pidfile(): "%ld\n"
    lines = [TRACE_LINE.fullmatch(line) for line in trace.read_text().splitlines()]
    io = [(m[1], m[2], m[3]) for m in lines if m]
    assert io == [
        ("IN", "WRITE", "/a v v"),
        ("OUT", "WRITE", "OK "),
        ("IN", "READ", "/nope "),
        ("OUT", "ERROR", "ENOENT "),
    ]
    assert trace.read_text().startswith("CREATE connection 0x")


def test_keep_orphans_gives_nodes_to_dom0(start_daemon) -> None:
    """-K: C domain_tree_remove() moves a released domain's nodes to dom0 (no events)."""
    conn = start_daemon("-K").conn()
    assert conn.req(Op.INTRODUCE, b"5\x001\x001\0") == b"OK\0"
    conn.req(Op.WRITE, b"/g\0v")
    conn.req(Op.SET_PERMS, b"/g\0n5\0r7\0")
    assert conn.req(Op.RELEASE, b"5\0") == b"OK\0"
    assert conn.req(Op.GET_PERMS, b"/g\0") == b"n0\0r7\0"


def test_help_names_the_ignored_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xenstored_sim", "-H"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for flag in ("--pid-file", "--trace-file", "--verbose", "--keep-orphans", "--no-fork"):
        assert flag in out
    assert "no meaning here" in out


def test_positional_arguments_are_refused() -> None:
    """C: "No arguments desired"."""
    proc = subprocess.run(
        [sys.executable, "-m", "xenstored_sim", "stray"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "unrecognized arguments: stray" in proc.stderr

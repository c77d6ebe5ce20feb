"""The durable store of xenstored-sim: journal file, fsync policy, snapshots, recovery.

Guarantees.  With ``--state-dir DIR`` every acknowledged change (WRITE, MKDIR, RM, SET_PERMS,
a committed transaction, INTRODUCE, RELEASE, SET_TARGET), with node generations and the
domain table, is appended to the journal *before* its reply, or any reply sent after it,
leaves the daemon.  What that survives depends on ``--sync``:

``always``
    fsync after every change, before its reply.  Survives a crash of the daemon and of the
    machine.
``batch`` (the default)
    group commit: the changes of all requests handled in one wake-up of the event loop are
    written, then fsynced once, before any of their replies is sent.  The same guarantee as
    ``always``, at the cost of one fsync per batch.
``none``
    write only.  Survives a crash or SIGKILL of the daemon (the data is in the page cache),
    not a crash of the machine.

A read's reply never overtakes the fsync of a change handled before it, so nothing a client
has seen can be lost under ``always`` and ``batch``.  Under every policy a restart after a
power cut holds a prefix of the history of changes.  These are checked on every state a crash
may leave (``tests/xenstored_sim/durability/test_crash_states.py``, ``make crash-states``);
every file operation goes through :mod:`.fileio`, which can record them for that purpose.

Files in DIR: ``snapshot`` (one framed msgpack record of the whole state, with the number of
the journal that follows it) and ``journal.<n>`` (framed records, appended).  When the journal
grows past ``journal_max`` bytes it is compacted: the state is written to ``snapshot.tmp``,
fsynced and renamed over ``snapshot``, a new empty journal ``journal.<n+1>`` is started and
the old one deleted.  Recovery loads the snapshot, replays its journal up to the first torn
record (short, over-long, empty or failing its CRC), drops the rest (logging it on stderr and
truncating the file there) and deletes stale files.  Ordering: the snapshot is fsynced before
its rename, and the directory is fsynced after it, before the first record of the new journal;
a journal's creation is made durable by a directory fsync before anything is acknowledged from
it.

Not restored: connections, watches and open transactions (clients reconnect after a crash
and start over), and quota limits, which come from the command line at each start.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from typing import Final

from ..core import XenstoreEngine
from ..core.journal import (
    Journal,
    JournalError,
    apply_records,
    load_snapshot,
    read_frames,
    recount,
)
from .fileio import FileIO

#: Journal size after which it is folded into a new snapshot.
DEFAULT_JOURNAL_MAX: Final = 8 << 20
SNAPSHOT: Final = "snapshot"


class SyncPolicy(enum.Enum):
    """When the journal is fsynced (see the module docstring)."""

    ALWAYS = "always"
    BATCH = "batch"
    NONE = "none"


def _log(message: str) -> None:
    print(f"xenstored-sim: state: {message}", file=sys.stderr, flush=True)


class DurableStore:
    """The state directory of one daemon; :meth:`open` recovers into the engine."""

    def __init__(
        self,
        state_dir: str,
        engine: XenstoreEngine,
        sync: SyncPolicy = SyncPolicy.BATCH,
        journal_max: int = DEFAULT_JOURNAL_MAX,
        io: FileIO | None = None,
    ) -> None:
        #: every file operation goes through here (recordable, see :mod:`.fileio`)
        self.io = io if io is not None else FileIO.from_environ()
        self.state_dir = state_dir
        self.engine = engine
        self.sync = sync
        self.journal_max = journal_max
        self.epoch = 0
        #: bytes written since the last fsync
        self.unsynced = False
        self._fd = -1
        self._size = 0
        self._journal: Journal | None = None

    # ----------------------------------------------------------------- recovery

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def open(self) -> None:
        """Restore the engine from DIR, then open the journal for appending."""
        io = self.io
        io.mkdirs(self.state_dir)
        engine = self.engine
        snap = self._path(SNAPSHOT)
        data = io.read_file(snap)
        if data is not None:
            try:
                self.epoch = load_snapshot(engine, data)
            except (JournalError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # The snapshot is only ever replaced by rename after fsync: a bad one is
                # damage from outside, and serving a wrong store would be worse than stopping.
                raise OSError(f"unreadable snapshot {snap}: {exc}") from exc
        path = self._path(f"journal.{self.epoch}")
        fd = io.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            io.fsync_dir(self.state_dir)  # the journal's directory entry survives a machine crash
            data = io.read_all(fd)
            payloads, good, problem = read_frames(data)
            if problem is not None:
                _log(f"{path}: {problem}; dropped {len(data) - good} bytes of a torn tail")
                io.ftruncate(fd, good)
                io.fsync(fd)
            try:
                apply_records(engine, payloads)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise OSError(f"unreadable journal {path}: {exc}") from exc
        except BaseException:
            io.close(fd)
            raise
        recount(engine.store)
        self._fd = fd
        self._size = good
        self._remove_stale()
        self._journal = Journal(engine)
        if payloads or problem is not None:
            _log(
                f"restored {len(engine.store.nodes)} nodes, {len(engine.domains)} domains "
                f"from {self.state_dir} ({len(payloads)} journal records)"
            )

    def _remove_stale(self) -> None:
        keep = {SNAPSHOT, f"journal.{self.epoch}"}
        for name in self.io.listdir(self.state_dir):
            if name not in keep and (name.startswith("journal.") or name == SNAPSHOT + ".tmp"):
                self.io.unlink(self._path(name))

    # ----------------------------------------------------------------- appending

    def record(self, with_domains: bool) -> bool:
        """Append what the last request changed; True if anything was written.

        Under ``always`` the record is fsynced before returning.
        """
        assert self._journal is not None
        rec = self._journal.record(with_domains)
        if rec is None:
            return False
        self.io.write_all(self._fd, rec)
        self._size += len(rec)
        if self.sync is SyncPolicy.ALWAYS:
            self.io.fsync(self._fd)
        else:
            self.unsynced = True
        return True

    def sync_journal(self) -> None:
        """fsync the journal: every record written so far survives a machine crash."""
        self.unsynced = False
        self.io.fsync(self._fd)

    def needs_compaction(self) -> bool:
        return self._size > self.journal_max

    def compact(self) -> None:
        """Write a snapshot of the current state and start a new, empty journal."""
        assert self._journal is not None
        epoch = self.epoch + 1
        body = self._journal.snapshot(epoch)
        io = self.io
        tmp = self._path(SNAPSHOT + ".tmp")
        fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            io.write_all(fd, body)
            io.fsync(fd)
        finally:
            io.close(fd)
        new = io.open(
            self._path(f"journal.{epoch}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        )
        io.rename(tmp, self._path(SNAPSHOT))
        io.fsync_dir(self.state_dir)
        old, self._fd = self._fd, new
        io.close(old)
        io.unlink(self._path(f"journal.{self.epoch}"))
        self.epoch = epoch
        self._size = 0
        self.unsynced = False

    def close(self) -> None:
        """fsync and close the journal (a clean stop loses nothing under any policy)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.io.fsync(self._fd)
            self.io.close(self._fd)
            self._fd = -1

"""The states a power cut may leave on disk, from a record of file operations (no I/O).

Theory of operation.  :class:`CrashModel` replays a record of file operations (the JSON lines
of :mod:`xenstored_sim.server.fileio`) and, at any point of it, lists the on-disk states a
crash at that point may leave, as ALICE (Pillai et al., OSDI 2014) and CrashMonkey (Mohan et
al., OSDI 2018) do.  The reference is a POSIX file system on Linux, ext4 with
``data=ordered``, taken at its guarantees rather than its habits:

* ``fsync(fd)`` and ``fdatasync(fd)`` make the file's data *and size* durable (fdatasync
  flushes the size too, because it is needed to read the data back), not its name: a file
  created, renamed or unlinked since its directory was last fsynced may appear under its old
  name, its new name, or both (a rename is atomic: the destination holds the old or the new
  file, never nothing).
* ``fsync`` of a directory makes its entries durable: every creation, rename and unlink in it
  that came before.
* A file's writes and truncations since its last fsync may each be absent, present, or (a
  write) torn: only a prefix of it reached the disk, cut at a 512-byte sector boundary or,
  to exercise the reader, half-way.  Any subset may persist, in any order; a later write
  beyond an absent earlier one leaves a hole that reads as zeros.  ``data=ordered`` forbids
  stale data, which the model never produces, but not holes.
* Directory operations since the directory's last fsync persist as any subset, in order
  (a superset of ext4's journal, which commits them as a prefix).

With few pending operations every combination is listed; past ``max_subset`` the listing
falls back to prefixes (in order, the next one possibly torn) and single omissions, so that a
long un-synced tail (``--sync none``) stays tractable.  Directories a record creates with
``mkdir`` are handled like files in their parent; a path outside every known directory's
parent is a directory that existed before the record started.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

#: Sector size: the unit a torn write is cut at.
SECTOR: Final = 512
#: Past this many pending operations, a file or directory lists prefixes, not subsets.
MAX_SUBSET: Final = 4


@dataclass(frozen=True, slots=True)
class FileOp:
    """One recorded operation (the fields its kind uses; see :mod:`..server.fileio`)."""

    op: str
    fd: int = -1
    path: str = ""
    src: str = ""
    dst: str = ""
    off: int = 0
    data: bytes = b""
    size: int = 0
    creat: bool = False
    trunc: bool = False


def parse_log(text: bytes) -> list[FileOp]:
    """The operations of a record; a last line cut short (the recorder died) is ignored."""
    ops = []
    for line in text.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            break
        data = bytes.fromhex(rec.pop("data", ""))
        rec.pop("append", None)
        ops.append(FileOp(data=data, **rec))
    return ops


def ops_before(text: bytes, offset: int) -> int:
    """How many whole operations a record holds in its first ``offset`` bytes."""
    return text[:offset].count(b"\n")


@dataclass(frozen=True, slots=True)
class _Write:
    off: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Trunc:
    size: int


_DataOp = _Write | _Trunc


@dataclass(slots=True)
class _Inode:
    is_dir: bool = False
    durable: bytes = b""
    current: bytearray = field(default_factory=bytearray)
    pending: list[_DataOp] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _DirOp:
    """``link`` name to ino (creation, or the new name of a rename whose old name is
    ``src``), or ``unlink`` name."""

    kind: str
    name: str
    ino: int
    src: str = ""


@dataclass(slots=True)
class _Dir:
    durable: dict[str, int] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    pending: list[_DirOp] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CrashState:
    """What a crash after ``point`` operations may leave under the root: files by path
    relative to it, and the directories the record created there."""

    point: int
    files: tuple[tuple[str, bytes], ...]
    dirs: tuple[str, ...]
    label: str
    #: some file holds neither its synced nor its latest content: a torn write, or writes
    #: kept out of order (what a power cut can leave and SIGKILL cannot)
    mixed: bool = False

    def key(self) -> tuple[tuple[tuple[str, bytes], ...], tuple[str, ...]]:
        return self.files, self.dirs


def _split(path: str) -> tuple[str, str]:
    head, _, name = path.rstrip("/").rpartition("/")
    return head or "/", name


def apply_data(base: bytes, ops: list[_DataOp]) -> bytes:
    """``base`` after ``ops`` in order; a write past the end leaves a hole of zeros."""
    content = bytearray(base)
    for op in ops:
        if isinstance(op, _Trunc):
            if op.size <= len(content):
                del content[op.size :]
            else:
                content.extend(bytes(op.size - len(content)))
        else:
            if op.off > len(content):
                content.extend(bytes(op.off - len(content)))
            content[op.off : op.off + len(op.data)] = op.data
    return bytes(content)


def torn(op: _Write) -> list[_Write]:
    """The prefixes of a write a crash may leave (never empty, never whole): cut at sector
    boundaries of the file, and half-way; at most three."""
    end = op.off + len(op.data)
    cuts = {b - op.off for b in range((op.off // SECTOR + 1) * SECTOR, end, SECTOR)}
    if len(op.data) > 1:
        cuts.add(len(op.data) // 2)
    ordered = sorted(cuts)
    if len(ordered) > 3:
        ordered = [ordered[0], ordered[len(ordered) // 2], ordered[-1]]
    return [_Write(op.off, op.data[:c]) for c in ordered]


def data_variants(durable: bytes, pending: list[_DataOp], max_subset: int) -> set[bytes]:
    """Every content a file may have after a crash, given its durable content and the
    operations since its last fsync."""
    if not pending:
        return {durable}
    choices: list[list[_DataOp | None]] = []
    for op in pending:
        opts: list[_DataOp | None] = [None, op]
        if isinstance(op, _Write):
            opts.extend(torn(op))
        choices.append(opts)
    out: set[bytes] = set()
    if len(pending) <= max_subset:
        for combo in itertools.product(*choices):
            out.add(apply_data(durable, [c for c in combo if c is not None]))
        return out
    for i in range(len(pending) + 1):  # prefixes, the next operation possibly torn
        for last in [None, *choices[i][2:]] if i < len(pending) else [None]:
            out.add(apply_data(durable, [*pending[:i], *([last] if last else [])]))
    for i in range(len(pending)):  # one operation lost, the others there
        out.add(apply_data(durable, pending[:i] + pending[i + 1 :]))
    return out


def dir_variants(d: _Dir, max_subset: int) -> list[dict[str, int]]:
    """Every set of entries a directory may hold after a crash."""
    n = len(d.pending)
    if n <= max_subset:
        picks: Iterator[tuple[bool, ...]] = itertools.product((False, True), repeat=n)
    else:
        picks = (tuple(j < i for j in range(n)) for i in range(n + 1))
    out: list[dict[str, int]] = []
    for pick in picks:
        entries = dict(d.durable)
        for op, keep in zip(d.pending, pick, strict=True):
            if keep:
                _apply_dir_op(entries, op)
        if entries not in out:
            out.append(entries)
    return out


def _apply_dir_op(entries: dict[str, int], op: _DirOp) -> None:
    if op.kind == "unlink":
        entries.pop(op.name, None)
        return
    entries[op.name] = op.ino
    if op.src and entries.get(op.src) == op.ino:
        del entries[op.src]


class CrashModel:
    """Replays a record; :meth:`states` lists the crash states at the current point."""

    def __init__(self, max_subset: int = MAX_SUBSET) -> None:
        self.max_subset = max_subset
        self.point = 0
        self.inodes: list[_Inode] = []
        self.dirs: dict[str, _Dir] = {}
        self.fds: dict[int, int] = {}

    def _dir(self, path: str) -> _Dir:
        return self.dirs.setdefault(path, _Dir())

    def _new_inode(self, is_dir: bool = False) -> int:
        self.inodes.append(_Inode(is_dir))
        return len(self.inodes) - 1

    def _dir_op(self, parent: str, op: _DirOp) -> None:
        d = self._dir(parent)
        _apply_dir_op(d.current, op)
        d.pending.append(op)

    def _data_op(self, ino: int, op: _DataOp) -> None:
        inode = self.inodes[ino]
        inode.current = bytearray(apply_data(bytes(inode.current), [op]))
        inode.pending.append(op)

    def apply(self, op: FileOp) -> None:
        """Replay one operation."""
        self.point += 1
        kind = op.op
        if kind == "open":
            parent, name = _split(op.path)
            ino = self._dir(parent).current.get(name)
            if ino is None:
                if not op.creat:
                    raise ValueError(f"open of {op.path}, which the record never created")
                ino = self._new_inode()
                self._dir_op(parent, _DirOp("link", name, ino))
            if op.trunc:
                self._data_op(ino, _Trunc(0))
            self.fds[op.fd] = ino
        elif kind == "write":
            self._data_op(self.fds[op.fd], _Write(op.off, op.data))
        elif kind == "ftruncate":
            self._data_op(self.fds[op.fd], _Trunc(op.size))
        elif kind in ("fsync", "fdatasync"):
            inode = self.inodes[self.fds[op.fd]]
            inode.durable = bytes(inode.current)
            inode.pending.clear()
        elif kind == "close":
            del self.fds[op.fd]
        else:
            self._apply_name_op(op)

    def _apply_name_op(self, op: FileOp) -> None:
        kind = op.op
        if kind == "rename":
            (sp, sn), (dp, dn) = _split(op.src), _split(op.dst)
            if sp != dp:
                raise ValueError(f"rename across directories: {op.src} -> {op.dst}")
            ino = self._dir(sp).current[sn]
            self._dir_op(sp, _DirOp("link", dn, ino, sn))
        elif kind == "unlink":
            parent, name = _split(op.path)
            ino = self._dir(parent).current[name]
            self._dir_op(parent, _DirOp("unlink", name, ino))
        elif kind == "mkdir":
            parent, name = _split(op.path)
            self._dir(op.path)
            self._dir_op(parent, _DirOp("link", name, self._new_inode(is_dir=True)))
        elif kind == "fsync_dir":
            d = self._dir(op.path)
            d.durable = dict(d.current)
            d.pending.clear()
        else:
            raise ValueError(f"unknown file operation {kind!r}")

    def live(self, root: str) -> dict[str, bytes]:
        """The files directly in ``root`` as a process sees them now (no crash)."""
        entries = self._dir(root.rstrip("/")).current
        return {
            name: bytes(self.inodes[ino].current)
            for name, ino in entries.items()
            if not self.inodes[ino].is_dir
        }

    def states(self, root: str) -> Iterator[CrashState]:
        """The crash states under directory ``root`` at this point (duplicates possible)."""
        root = root.rstrip("/")
        tree = self._tree_variants(root)
        for entries in tree:
            files = [(rel, ino) for rel, ino in entries if not self.inodes[ino].is_dir]
            dirs = tuple(sorted(rel for rel, ino in entries if self.inodes[ino].is_dir))
            variants = [
                sorted(
                    data_variants(
                        self.inodes[ino].durable, self.inodes[ino].pending, self.max_subset
                    )
                )
                for _, ino in files
            ]
            plain = [
                {self.inodes[ino].durable, bytes(self.inodes[ino].current)} for _, ino in files
            ]
            for contents in itertools.product(*variants):
                mixed = any(c not in p for c, p in zip(contents, plain, strict=True))
                yield CrashState(
                    self.point,
                    tuple(sorted(zip((rel for rel, _ in files), contents, strict=True))),
                    dirs,
                    f"after op {self.point}" + (", writes torn or reordered" if mixed else ""),
                    mixed,
                )

    def _tree_variants(self, root: str) -> list[list[tuple[str, int]]]:
        """Every set of (relative path, inode) under ``root`` a crash may leave."""
        out: list[list[tuple[str, int]]] = []
        for entries in dir_variants(self._dir(root), self.max_subset):
            levels: list[list[list[tuple[str, int]]]] = []
            for name, ino in sorted(entries.items()):
                if self.inodes[ino].is_dir:
                    sub = self._tree_variants(f"{root}/{name}")
                    levels.append([[(name, ino)] + [(f"{name}/{r}", i) for r, i in s] for s in sub])
                else:
                    levels.append([[(name, ino)]])
            for combo in itertools.product(*levels):
                out.append([e for part in combo for e in part])
        return out


def explore(ops: list[FileOp], root: str, max_subset: int = MAX_SUBSET) -> Iterator[CrashState]:
    """The crash states under ``root`` at every point of a record, from before its first
    operation to after its last (duplicates possible: dedupe on :meth:`CrashState.key`)."""
    model = CrashModel(max_subset)
    yield from model.states(root)
    for op in ops:
        model.apply(op)
        yield from model.states(root)

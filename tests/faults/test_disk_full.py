"""Disk full while writing a save image: a clear error, nothing under the final name, no
``.tmp`` left, and the domain still there and resumable.

The image goes to a 128 KiB tmpfs (ENOSPC).  Where mounting is not permitted the same save runs
under ``RLIMIT_FSIZE`` instead, which makes the write fail with EFBIG."""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from physmap_lab.stack import Stack

#: Well under what the drawn framebuffer alone takes in the image (320x200x4 octets), so that
#: the write fails even though an image may leave its zero pages as holes.
LIMIT = 128 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A directory on a tiny filesystem, and whether it really is one (else use the rlimit)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    mounted = done.returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


async def test_disk_full_during_save(stack: Stack, xl: Any, small_disk: tuple[Path, bool]) -> None:
    directory, mounted = small_disk
    created = await xl("create", "--memory", "16")
    d = created["domid"]
    fb = await xl.draw(d, seed=3)
    image = directory / "guest.img"
    proc = await trio.run_process(
        xl.argv("save", str(d), str(image)),
        env=stack.env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        preexec_fn=None if mounted else _limit_file_size,
    )
    out = json.loads(proc.stdout or b"{}")
    message = xl.clear_failure(proc.returncode, out, proc.stderr.decode())
    expected = "No space left on device" if mounted else "File too large"
    assert expected in message and "left paused" in message, message
    assert not image.exists()
    assert list(directory.iterdir()) == []
    (info,) = (await xl("list"))["domains"]
    assert info["domid"] == d and info["paused"] is True
    await xl("unpause", str(d))
    assert await xl.fb_hash(d) == fb
    # And a save to a disk with room works.
    await xl("save", str(d), str(directory.parent / "roomy.img"))

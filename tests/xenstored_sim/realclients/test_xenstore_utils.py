"""Debian's xenstore-utils (libxenstore's command-line clients) against the daemon.

They find the daemon through XENSTORED_PATH, as libxenstore does (docs/xenstore.md, 'Socket
location'). ``scripts/install-debian-packages.sh`` installs them.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import trio

# The conftest's Daemon; conftest is no module.
Daemon = Any

LIMIT = 10
TOOLS = ["read", "write", "ls", "chmod", "rm", "list", "exists", "watch"]


def tool(name: str) -> str:
    path = shutil.which(f"xenstore-{name}")
    assert path, f"xenstore-{name} is missing: run scripts/install-debian-packages.sh"
    return path


async def run(daemon: Daemon, name: str, *args: str, ok: bool = True) -> tuple[int, str]:
    proc = await trio.run_process(
        [tool(name), *args],
        env=daemon.client_env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, (name, args, proc.stderr.decode())
    return proc.returncode, proc.stdout.decode()


def ls_line(name: str, value: str, perms: str, depth: int = 0) -> tuple[str, str, str]:
    return (" " * depth + name, value, perms)


def parse_ls_p(out: str) -> list[tuple[str, str, str]]:
    """``xenstore-ls -p`` lines: ``<indent>name = "value" . . .  (perms)``."""
    rows = []
    for line in out.splitlines():
        name, _, rest = line.partition(" = ")
        value = rest[1 : rest.index('"', 1)]
        perms = rest[rest.rindex("(") + 1 : rest.rindex(")")]
        rows.append((name, value, perms))
    return rows


@pytest.mark.parametrize("name", TOOLS)
def test_tool_is_installed(name: str) -> None:
    assert tool(name)


async def test_write_read_list_exists(xenstored: Daemon) -> None:
    with trio.fail_after(LIMIT):
        await run(xenstored, "write", "/smoke/a/b", "1", "/smoke/c", "two words")
        assert (await run(xenstored, "read", "/smoke/a/b"))[1] == "1\n"
        assert (await run(xenstored, "read", "/smoke/c", "/smoke/a/b"))[1] == "two words\n1\n"
        assert (await run(xenstored, "list", "/smoke"))[1] == "a\nc\n"
        assert (await run(xenstored, "exists", "/smoke/c"))[0] == 0
        assert (await run(xenstored, "exists", "/smoke/nope", ok=False))[0] != 0
        rc, out = await run(xenstored, "read", "/smoke/nope", ok=False)
        assert rc != 0 and out == ""


async def test_ls_p_shows_values_and_perms(xenstored: Daemon) -> None:
    with trio.fail_after(LIMIT):
        await run(xenstored, "write", "/smoke/a/b", "1", "/smoke/c", "2")
        await run(xenstored, "chmod", "/smoke/c", "b0", "r5", "w7")
        _, out = await run(xenstored, "ls", "-p", "/smoke")
        assert parse_ls_p(out) == [
            ls_line("a", "", "n0"),
            ls_line("b", "1", "n0", depth=1),
            ls_line("c", "2", "b0,r5,w7"),
        ]


async def test_chmod_recursive(xenstored: Daemon) -> None:
    with trio.fail_after(LIMIT):
        await run(xenstored, "write", "/smoke/a/b", "1")
        await run(xenstored, "chmod", "-r", "/smoke", "n0", "r1")
        _, out = await run(xenstored, "ls", "-p", "/smoke")
        assert [row[2] for row in parse_ls_p(out)] == ["n0,r1", "n0,r1"]


async def test_rm(xenstored: Daemon) -> None:
    with trio.fail_after(LIMIT):
        await run(xenstored, "write", "/smoke/a/b", "1", "/smoke/c", "2")
        await run(xenstored, "rm", "/smoke/a")
        assert (await run(xenstored, "list", "/smoke"))[1] == "c\n"
        assert (await run(xenstored, "exists", "/smoke/a/b", ok=False))[0] != 0
        await run(xenstored, "rm", "/smoke")
        assert (await run(xenstored, "list", "/", ok=True))[1].split() == ["tool"]


async def test_watch_until_killed(xenstored: Daemon) -> None:
    lines: list[str] = []
    with trio.fail_after(LIMIT):
        proc = await trio.lowlevel.open_process(
            [tool("watch"), "/smoke/w"], env=xenstored.client_env(), stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        buffered = b""

        async def next_line() -> str:
            nonlocal buffered
            while b"\n" not in buffered:
                chunk = await proc.stdout.receive_some()  # type: ignore[union-attr]
                assert chunk, f"xenstore-watch exited early with {await proc.wait()}"
                buffered += chunk
            line, _, buffered = buffered.partition(b"\n")
            return line.decode()

        try:
            # The registration event proves the watch is set before anything changes.
            lines.append(await next_line())
            await run(xenstored, "write", "/smoke/w", "1")
            lines.append(await next_line())
            await run(xenstored, "write", "/smoke/w/x", "2")
            lines.append(await next_line())
            await run(xenstored, "rm", "/smoke/w")
            lines.append(await next_line())
        finally:
            proc.terminate()
            await proc.wait()
            await proc.stdout.aclose()
    assert lines == ["/smoke/w", "/smoke/w", "/smoke/w/x", "/smoke/w"]


async def test_watch_n_exits_by_itself(xenstored: Daemon) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                lambda task_status: trio.run_process(
                    [tool("watch"), "-n", "2", "/smoke/n"],
                    env=xenstored.client_env(),
                    capture_stdout=True,
                    task_status=task_status,
                )
            )
            # Either order works: the registration event is the first line in any case.
            while proc.returncode is None:
                await run(xenstored, "write", "/smoke/n", "x")
                await trio.sleep(0.05)
    assert proc.returncode == 0

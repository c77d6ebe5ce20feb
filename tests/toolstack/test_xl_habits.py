"""``xl-sim`` takes xl's habits (xl(1), xl.cfg(5), Xen tools/xl/xl_cmdtable.c): a whole xl.cfg,
domain names for ``<Domain>``, ``save -c/-p``, ``restore [-p] [CONFIG] FILE``, ``list`` laid out
as ``xl list`` with ``-l``, ``info``, ``domid``/``domname`` and ``vncviewer``."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import trio

from physmap_lab.stack import Stack, executable
from tests.toolstack.test_screen import free_display

HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([rbpscd-]{6})\s+(\d+\.\d)$")

XL_CFG = """# as one writes it for xl
type = "hvm"
name = "habits"
memory = 16
vcpus = 2
disk = [ 'phy:/dev/vg/habits,xvda,w',
         'file:/srv/cd.iso,hdc:cdrom,r' ]
vif = [ 'bridge=xenbr0' ]
on_crash = "preserve"
serial = 'pty'; usb = 1
"""


async def human(
    stack: Stack, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``xl-sim ARGS`` without ``--json``: status, stdout, stderr."""
    proc = await trio.run_process(
        [executable("xl-sim"), "--rundir", str(stack.rundir), *args],
        env=env or stack.env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def rows(text: str) -> dict[str, tuple[str, ...]]:
    lines = text.splitlines()
    assert lines[0] == HEADER
    out = {}
    for line in lines[1:]:
        m = ROW.match(line)
        assert m, f"not an xl list row: {line!r}"
        out[m.group(1)] = m.groups()[1:]
    return out


async def test_a_full_xl_cfg_warns_once_per_ignored_option_and_lists_as_xl(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    cfg = tmp_path / "habits.cfg"
    cfg.write_text(XL_CFG)
    rc, _, err = await human(stack, "create", str(cfg))
    assert rc == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert [w.split(": ignoring ")[1].split(":")[0] for w in warned] == [
        "disk",
        "vif",
        "serial",
        "usb",
    ]
    assert f"{cfg}:6: ignoring disk" in warned[0]
    rc, listing, _ = await human(stack, "list")
    table = rows(listing)
    assert list(table) == ["Domain-0", "habits"]
    assert table["Domain-0"][0] == "0" and table["Domain-0"][3] == "r-----"
    domid, mem, vcpus, state, _ = table["habits"]
    # Mem is what the domain holds: its 16 MiB of RAM and stdvga's 16 MiB of video memory.
    assert (mem, vcpus, state) == ("32", "2", "r-----")
    await human(stack, "pause", "habits")
    before = float(rows((await human(stack, "list", "habits"))[1])["habits"][4])
    await trio.sleep(0.3)
    paused = rows((await human(stack, "list", "habits"))[1])["habits"]
    assert paused[3] == "--p---"
    assert float(paused[4]) == before  # a paused domain's vCPUs do not run
    await human(stack, "unpause", "habits")
    await trio.sleep(0.3)
    assert float(rows((await human(stack, "list"))[1])["habits"][4]) > before
    rc, long_form, _ = await human(stack, "list", "-l", "habits")
    [entry] = json.loads(long_form)
    assert entry["domid"] == int(domid)
    config = entry["config"]
    assert config["c_info"]["name"] == "habits" and config["on_crash"] == "preserve"
    assert config["b_info"]["max_vcpus"] == 2 and config["b_info"]["max_memkb"] == 16 * 1024
    assert (await xl("domid", "habits"))["domid"] == int(domid)
    assert (await xl("domname", domid))["name"] == "habits"
    await xl("destroy", "habits")
    assert list(rows((await human(stack, "list"))[1])) == ["Domain-0"]


async def test_a_name_is_taken_wherever_xl_takes_a_domain(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    created = await xl("create", "--name", "named", "--memory", "16")
    assert (await xl("pause", "named"))["domid"] == created["domid"]
    assert (await xl("unpause", "named"))["paused"] is False
    await xl("guest", "named", "xs-write", "data/x", "1")
    assert (await xl("guest", "named", "xs-read", "data/x"))["value"] == "1"
    for args in (("pause", "nobody"), ("save", "nobody", str(tmp_path / "x")), ("list", "nobody")):
        rc, out, _ = await xl.run(*args)
        assert rc == 1 and out["error"] == "'nobody' is not a domain name or id"
    rc, out, _ = await xl.run("destroy", "Domain-0")
    assert rc == 1 and "domain 0 is the control domain" in out["error"]
    # save -c: a checkpoint, by name; the domain runs on.
    image = tmp_path / "named.img"
    await xl("save", "-c", "named", str(image))
    [dom] = (await xl("list"))["domains"]
    assert dom["state"] == "r-----"
    # save -p: kept, paused.
    await xl("save", "-p", "named", str(tmp_path / "p.img"))
    [dom] = (await xl("list"))["domains"]
    assert dom["state"] == "--p---"
    await xl("destroy", "named")
    # The device model's log outlives its domain, as xl keeps qemu-dm-NAME.log.
    log = (stack.rundir / "dm" / f"{created['domid']}.log").read_text()
    assert f"qemu-model: ready on {stack.rundir}/qmp/{created['domid']}.sock" in log


async def test_restore_takes_p_and_a_config_before_the_file(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    created = await xl("create", "--name", "orig", "--memory", "16")
    image = tmp_path / "orig.img"
    await xl("save", str(created["domid"]), str(image))
    cfg = tmp_path / "new.cfg"
    cfg.write_text('name = "renamed"\nmemory = 64\nvcpus = 3\nvif = [ "bridge=xenbr0" ]\n')
    rc, out, err = await xl.run("restore", "-p", str(cfg), str(image))
    assert rc == 0, err
    assert out["name"] == "renamed"
    assert "memory_mib is taken from the saved image" in err
    assert "ignoring vif" in err
    [dom] = (await xl("list"))["domains"]
    assert (dom["name"], dom["state"], dom["vcpus"], dom["mem_mib"]) == (
        "renamed", "--p---", 3, 32,
    )  # fmt: skip
    await xl("unpause", "renamed")
    [dom] = (await xl("list"))["domains"]
    assert dom["state"] == "r-----"
    rc, out, _ = await xl.run("restore", str(cfg), str(image), str(image))
    assert rc == 1 and "too many files" in out["error"]
    await xl("destroy", "renamed")


async def test_info_describes_the_host_as_xl_info(stack: Stack, xl: Any) -> None:
    rc, text, _ = await human(stack, "info")
    assert rc == 0
    fields = dict(line.split(" : ", 1) for line in text.splitlines())
    assert {k.rstrip() for k in fields} >= {"host", "nr_cpus", "total_memory", "xen_version"}
    assert fields["host".ljust(22)] == os.uname().nodename
    info = await xl("info")
    assert info["nr_cpus"] == os.cpu_count() and info["xen_major"] == 4


async def test_vncviewer_starts_the_viewer_on_the_domain_display(
    stack: Stack, xl: Any, tmp_path: Path
) -> None:
    plain = await xl("create", "--name", "novnc", "--memory", "16")
    rc, out, _ = await xl.run("vncviewer", "novnc")
    assert rc == 1 and "has no VNC server" in out["error"]
    await xl("destroy", str(plain["domid"]))
    display = free_display()
    cfg = tmp_path / "vnc.cfg"
    cfg.write_text(f'name = "vnc"\nmemory = 16\nvnc = 1\nvncdisplay = {display}\nvncunused = 0\n')
    await xl("create", str(cfg))
    found = await xl("vncviewer", "vnc")
    assert found["address"] == f"127.0.0.1:{5900 + display}" and found["display"] == display
    # xl execs $VNCVIEWER HOST:DISPLAY; a stand-in viewer records what it was given.
    record = tmp_path / "viewer.args"
    viewer = tmp_path / "viewer"
    viewer.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(record)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
    )
    viewer.chmod(0o755)
    rc, text, err = await human(
        stack, "vncviewer", "vnc", env=stack.env() | {"VNCVIEWER": str(viewer)}
    )
    assert rc == 0, err
    assert text.strip() == f"127.0.0.1:{5900 + display} (display {display})"
    assert record.read_text() == f"127.0.0.1:{display}"
    await xl("destroy", "vnc")

"""``qemu-model --hostile``: bad scripts are refused in one line; restrict as QEMU 2.10 and 3.0.

The restrict test runs real daemons and a real guest: the attacker holds a restricted device
model's handles, and what it reaches is what each QEMU release's ``xen_restrict`` left open.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import trio

from physmap_lab.stack import Stack, executable, open_stack


def _hostile(tmp: Path, script: object, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp / "script.json"
    path.write_text(json.dumps(script))
    argv = [executable("qemu-model"), "--hostile", str(path), "--domid", "1", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_bad_scripts_get_one_line(tmp_path: Path) -> None:
    for script, words in (
        ({"attack": "xs-read"}, "JSON list"),
        ([{"attack": "rowhammer"}], "'attack' must be one of"),
    ):
        proc = _hostile(tmp_path, script, "--rundir", str(tmp_path))
        assert proc.returncode == 1
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    missing = subprocess.run(
        [
            executable("qemu-model"),
            "--hostile",
            str(tmp_path / "nope.json"),
            "--domid",
            "1",
            "--rundir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = _hostile(tmp_path, [], "--rundir", str(tmp_path), "--qemu-version", "three")
    assert bad.returncode == 2 and "bad QEMU version" in bad.stderr


async def test_restrict_closes_xenstore_only_from_qemu_3(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    async with open_stack(rundir) as stack:
        env = stack.env()
        domids = []
        for name in ("a", "b"):
            out = await trio.run_process(
                [
                    executable("xl-sim"),
                    "--rundir",
                    str(rundir),
                    "--json",
                    "create",
                    "--name",
                    name,
                    "--memory",
                    "16",
                    "--dm-restrict",
                ],
                capture_stdout=True,
                env=env,
            )
            domids.append(int(json.loads(out.stdout)["domid"]))
        a, b = domids
        script: list[dict[str, Any]] = [
            {"attack": "xs-read", "path": f"/local/domain/{b}/name"},
            {"attack": "foreign-map", "domid": b, "gfn": 0, "pages": 1},
            {"attack": "foreign-map", "domid": a, "gfn": 0, "pages": 1},
        ]
        results = {}
        for version in ("2.10", "3.0"):
            proc = await trio.to_thread.run_sync(
                lambda v=version: _hostile(
                    tmp_path,
                    script,
                    "--rundir",
                    str(rundir),
                    "--restrict",
                    "--xenstore",
                    str(Stack(rundir).xenstored_socket),
                    "--qemu-version",
                    v,
                )
            )
            assert proc.returncode == 0, proc.stderr
            results[version] = [json.loads(line) for line in proc.stdout.splitlines()]
        for domid in domids:
            await trio.run_process(
                [executable("xl-sim"), "--rundir", str(rundir), "destroy", str(domid)], env=env
            )
    read, other, own = results["2.10"]
    # 2.10: the privileged xenstore handle survives xen_restrict.
    assert read["result"] == "succeeded" and read["detail"]["value"] == "b"
    assert (other["result"], other["errno"]) == ("refused", "EPERM")
    assert own["result"] == "succeeded"
    read, other, own = results["3.0"]
    assert (read["result"], read["errno"]) == ("refused", "EBADF")
    assert (other["result"], other["errno"]) == ("refused", "EPERM")
    assert own["result"] == "succeeded"

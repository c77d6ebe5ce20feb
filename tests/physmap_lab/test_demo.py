"""The demo's pure part (the plan, the verdict, the table) and its command line; the whole stack
runs in tests/e2e."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from hypervisor_sim import guest_drivers
from physmap_lab.cli import build_parser, main, results_table
from physmap_lab.demo import (
    Case,
    Observed,
    StepError,
    device_models,
    evaluate,
    expected_to_work,
    failed_unexpectedly,
    leftover_files,
    pattern_sha256,
    plan,
    run_demo,
    worked_unexpectedly,
)


def _seen_all_agree(case: Case) -> Observed:
    good = pattern_sha256(case.device, case.seed)
    return Observed(
        domid_saved=1,
        domid_restored=2,
        fb_sha256_guest_saved=good,
        fb_sha256_dm_saved=good,
        fb_sha256_dm_restored=good,
        fb_sha256_guest_restored=good,
        dm_mode=case.mode,
        dm_restricted=False,
        vram_ptr_at_init=0x7F0000000000,
        vram_ptr_after_load=0x7F0000000000,
        derived_ptrs_valid=True,
        image_records=["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"],
    )


OPS = (
    {"toolstack": 1, "device-model": 0, "guest": 0},
    {"toolstack": 0, "device-model": 0, "guest": 0},
)


# ---------------------------------------------------------------------------------- plan


def test_the_default_plan_is_two_modes_by_three_devices() -> None:
    cases = plan()
    assert [(c.mode, c.device, c.toolstack) for c in cases] == [
        (m, d, "libxl") for m in ("new", "compat") for d in ("stdvga", "cirrus", "qxl")
    ]
    assert all(expected_to_work(c) for c in cases)


def test_plan_keeps_the_order_given_and_drops_repeats() -> None:
    cases = plan(["compat", "new", "compat"], ["qxl"], ["unaware", "libxl"])
    assert [c.label for c in cases] == [
        "compat/qxl/unaware",
        "compat/qxl/libxl",
        "new/qxl/unaware",
        "new/qxl/libxl",
    ]


@pytest.mark.parametrize(
    ("mode", "device", "toolstack", "works"),
    [
        ("new", "qxl", "unaware", True),
        ("auto", "cirrus", "libxl", True),
        ("compat", "stdvga", "unaware", False),
        ("pointer-fixup", "stdvga", "libxl", True),
        ("pointer-fixup", "qxl", "libxl", False),
    ],
)
def test_expected_to_work(mode: str, device: str, toolstack: str, works: bool) -> None:
    assert expected_to_work(Case(mode, device, toolstack)) is works


def test_each_case_draws_a_pattern_of_its_own() -> None:
    seeds = {c.seed for c in plan(["new", "compat", "auto"], ["stdvga", "cirrus", "qxl"])}
    assert len(seeds) == 9


def test_pattern_sha256_is_the_hash_of_the_visible_framebuffer() -> None:
    gpa, length = guest_drivers.framebuffer("qxl", 0xF0000000, 800, 600, 32)
    assert (gpa, length) == (0xF0000000, 800 * 600 * 4)
    expected = hashlib.sha256(guest_drivers.pattern_bytes(7, length)).hexdigest()
    assert pattern_sha256("qxl", 7) == expected
    assert pattern_sha256("qxl", 8) != expected


# ------------------------------------------------------------------------------ verdict


def test_a_case_where_every_view_agrees_is_ok() -> None:
    case = Case("new", "qxl")
    r = evaluate(case, _seen_all_agree(case), OPS, 1.25)
    assert r.ok and r.error is None and r.expected_ok
    assert r.fb_sha256_saved == r.fb_sha256_restored == pattern_sha256("qxl", case.seed)
    assert r.physmap_xenstore_ops == OPS[0] and r.physmap_xenstore_ops_ok == OPS[1]
    assert r.domids == [1, 2] and r.dm == "new"
    assert failed_unexpectedly([r]) == []


@pytest.mark.parametrize(
    "view",
    [
        "fb_sha256_guest_saved",
        "fb_sha256_dm_saved",
        "fb_sha256_dm_restored",
        "fb_sha256_guest_restored",
    ],
)
def test_any_view_that_differs_fails_the_case(view: str) -> None:
    case = Case("compat", "cirrus")
    seen = _seen_all_agree(case)
    setattr(seen, view, None)
    r = evaluate(case, seen, OPS, 1.0)
    assert not r.ok
    assert r.error is not None and "no picture" in r.error
    assert failed_unexpectedly([r]) == [r]


def test_stale_derived_pointers_fail_the_case() -> None:
    case = Case("pointer-fixup", "qxl")
    seen = _seen_all_agree(case)
    seen.derived_ptrs_valid = False
    r = evaluate(case, seen, None, 1.0)
    assert not r.ok and "derived pointers" in (r.error or "")
    # It was expected to fail, so it does not fail the demo.
    assert failed_unexpectedly([r]) == []
    assert worked_unexpectedly([r]) == []
    assert r.physmap_xenstore_ops is None


def test_a_case_that_must_break_but_restores_intact_is_flagged() -> None:
    case = Case("pointer-fixup", "qxl")
    r = evaluate(case, _seen_all_agree(case), None, 1.0)
    assert r.ok and not r.expected_ok
    assert worked_unexpectedly([r]) == [r]
    assert failed_unexpectedly([r]) == []


def test_a_step_error_is_the_cases_error() -> None:
    case = Case("new", "stdvga")
    seen = Observed(error="xl-sim create: no memory")
    r = evaluate(case, seen, OPS, 0.1)
    assert (r.ok, r.error, r.domids) == (False, "xl-sim create: no memory", [])


@given(
    st.sampled_from(["new", "compat"]),
    st.sampled_from(["stdvga", "cirrus", "qxl"]),
    st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_ok_only_when_the_restored_picture_is_the_drawn_one(
    mode: str, device: str, digest: str
) -> None:
    case = Case(mode, device)
    seen = _seen_all_agree(case)
    seen.fb_sha256_dm_restored = digest
    r = evaluate(case, seen, OPS, 1.0)
    assert r.ok == (digest == pattern_sha256(device, case.seed))


def test_the_json_object_has_the_contract_fields() -> None:
    case = Case("new", "stdvga")
    obj = evaluate(case, _seen_all_agree(case), OPS, 1.0).as_json()
    for key in (
        "mode",
        "device",
        "toolstack",
        "dm",
        "ok",
        "error",
        "fb_sha256_saved",
        "fb_sha256_restored",
        "vram_ptr_at_init",
        "vram_ptr_after_load",
        "derived_ptrs_valid",
        "image_records",
        "physmap_xenstore_ops",
    ):
        assert key in obj, key


# -------------------------------------------------------------------------------- table


def test_the_table_shows_each_case() -> None:
    good = Case("new", "qxl")
    bad = Case("compat", "cirrus")
    seen_bad = _seen_all_agree(bad)
    seen_bad.fb_sha256_dm_restored = None
    seen_bad.vram_ptr_after_load = 0x7F0000001000
    results = [evaluate(good, _seen_all_agree(good), OPS, 1.0), evaluate(bad, seen_bad, OPS, 1.0)]
    console = Console(record=True, width=200)
    console.print(results_table(results, wide=True))
    text = console.export_text()
    assert pattern_sha256("qxl", good.seed)[:12] in text
    assert "0x7f0000000000 (same)" in text
    assert "0x7f0000000000 → 0x7f0000001000" in text
    assert "FAIL" in text
    assert "LIBXC EMU END" in text
    assert "1 (0 ok) · 0 · 0" in text


def test_the_compact_table_keeps_every_column_readable_at_100_columns() -> None:
    cases = [Case(m, d) for m in ("new", "compat", "pointer-fixup") for d in ("stdvga", "qxl")]
    results = []
    for case in cases:
        seen = _seen_all_agree(case)
        if case.mode == "pointer-fixup":
            seen.vram_ptr_after_load = 0x7F0000001000
            seen.derived_ptrs_valid = case.device != "qxl"
        results.append(evaluate(case, seen, OPS, 1.0))
    console = Console(record=True, width=100)
    console.print(results_table(results))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text  # nothing cut short
    header = "\n".join(text.splitlines()[:6])
    for word in ("case", "result", "restored", "derived", "ptrs ok", "records", "physmap ops"):
        assert word in header
    rows = [line for line in text.splitlines() if line.startswith(" pointer-fixup")]
    assert len(rows) == 2 and re.search(r"\bmoved +yes\b", rows[0])
    assert re.search(r"\bmoved +no\b", rows[1]) and "fails" in rows[1]
    assert pattern_sha256("qxl", cases[1].seed)[:8] + " → same" in text


# --------------------------------------------------------------------- command line


def test_modes_and_devices_accumulate() -> None:
    args = build_parser().parse_args(
        ["demo", "--mode", "new", "--mode", "compat", "auto", "--device", "qxl", "--json"]
    )
    assert (args.modes, args.devices, args.json) == (["new", "compat", "auto"], ["qxl"], True)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--mode", "fast"],
        ["demo", "--device", "vmware"],
        ["audit", "--repeats", "0"],
        ["audit", "--mode", "fast"],
        [],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.match(r"physmap-lab( \w+)?: error: ", capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--attach"], "--attach needs --rundir"),
        (["demo", "--migrate", "--attach", "--rundir", "/x"], "--migrate starts its own"),
    ],
)
def test_a_wrong_combination_is_one_line_not_the_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("physmap-lab: error: ")
    assert message in err and "usage" not in err


def test_progress_is_plain_lines_off_a_terminal_and_cases_are_counted_right(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rich.console import Console

    from physmap_lab.cli import _cases
    from physmap_lab.progress import Ticker

    assert (_cases(1), _cases(2)) == ("1 case", "2 cases")
    err = Console(stderr=True, force_terminal=False)
    with Ticker(err, 2, "audit") as t:
        t.note("[bold]a note[/bold]")
        t.step("not repeated")
        t.advance("[1/2] first [cell]")
        t.grow(1)
    assert capsys.readouterr().err.splitlines() == ["a note", "[1/2] first [cell]"]


@pytest.mark.integration
def test_help_names_the_demo_and_the_audit() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "physmap_lab", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in proc.stdout and "audit" in proc.stdout


@pytest.mark.integration
def test_attach_without_daemons_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--rundir", str(tmp_path), "--attach", "--device", "stdvga"]) == 1
    assert f"no xenstored-sim accepts connections on {tmp_path}/socket" in capsys.readouterr().err


async def test_run_demo_attach_refuses_an_empty_rundir(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="--attach"):
        await run_demo([Case("new", "stdvga")], rundir=tmp_path, attach=True)


# --------------------------------------------------------------- what is left behind


def test_leftover_files(tmp_path: Path) -> None:
    for name in (
        "socket",
        "domains/3.sock",
        "qmp/3.sock",
        "mem/dom3.mem",
        "mem/dom4.mem",
        "dm/3.log",
        "audit/xenstored.jsonl",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    everything = {p.relative_to(tmp_path).as_posix() for p in leftover_files(tmp_path)}
    assert everything == {"socket", "domains/3.sock", "qmp/3.sock", "mem/dom3.mem", "mem/dom4.mem"}
    of_4 = {p.relative_to(tmp_path).as_posix() for p in leftover_files(tmp_path, [4])}
    assert of_4 == {"mem/dom4.mem"}


async def test_a_stray_device_model_is_found_by_its_command_line(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-model"
    fake.write_text("import time\ntime.sleep(60)\n")
    rundir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(fake), "--domid", "5", "--rundir", str(rundir)])
    try:
        with trio.fail_after(10):
            while proc.pid not in device_models(rundir):
                await trio.sleep(0.01)
        assert device_models(rundir, [5]) == [proc.pid]
        assert device_models(rundir, [6]) == []
        assert device_models(tmp_path / "elsewhere") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.pid not in device_models(rundir)
    assert os.path.exists(fake)

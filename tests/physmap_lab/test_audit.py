"""Pure parts of ``physmap-lab audit``: phases, outcomes, least privilege, pictures."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from physmap_lab.audit.findings import least_privilege
from physmap_lab.audit.phases import PhaseClock
from physmap_lab.audit.privilege import needed, template
from physmap_lab.audit.report import cost_rows, markdown
from physmap_lab.audit.runner import matrix
from physmap_lab.audit.scenario import build, expected_outcome, median, outcome
from physmap_lab.audit.svg import matrix_svg, ops_chart_svg, sequence_svg
from physmap_lab.auditlog import parse_xenstored
from physmap_lab.cli import build_parser, main
from physmap_lab.demo import Case, Observed, evaluate, pattern_sha256

DM = ["qemu-model", "--domid", "3"]
XL = ["xl-sim", "save", "3"]


def rec(t: float, op: str, path: str, cmd: list[str], result: str = "OK", **kw: Any) -> Any:
    return parse_xenstored(
        {
            "t": t,
            "conn": 1,
            "domid": 0,
            "priv": True,
            "op": op,
            "path": path,
            "tx": 0,
            "result": result,
            "rule": "privileged",
            "pid": 1,
            "cmdline": cmd,
            **kw,
        }
    )


def test_the_matrix_runs_restricted_cells_as_qemu_2_10_and_3_0() -> None:
    """Restriction differs by QEMU version (xen_restrict in 2.10, xentoolcore_restrict_all from
    3.0); a privileged device model does not, so it runs once, and the 3.0 cells use the first
    device only."""
    cells = matrix()
    assert len(cells) == 42 == len(set(cells))
    assert sum(c.restrict for c in cells) == 24
    assert {c.qemu for c in cells if not c.restrict} == {"2.10"}
    assert {c.qemu for c in cells if c.restrict} == {"2.10", "3.0"}
    assert {c.device for c in cells if c.qemu == "3.0"} == {"stdvga"}


@pytest.mark.parametrize(
    "qemu, want", [("2.10", ["intact", "aborted"]), ("3.0", ["refused", "refused"])]
)
def test_expected_outcome_of_restricted_compat_depends_on_the_qemu(
    qemu: str, want: list[str]
) -> None:
    """QEMU 2.10 xen_restrict takes the compat stubs' ENOTTY as success: the device model
    starts, keeps xenstore and behaves as an unrestricted one."""
    got = [
        expected_outcome(Case("compat", "stdvga", ts, restrict=True, qemu=qemu))
        for ts in ("libxl", "unaware")
    ]
    assert got == want


def test_phase_clock_gives_the_phase_of_the_last_step_started() -> None:
    clock = PhaseClock({"create": (1.0, 2.0), "map-bar": (3.0, 3.5), "save": (5.0, 6.0)})
    assert clock.phase_at(0.5) is None
    assert clock.phase_at(2.5) == "boot"
    assert clock.phase_at(4.0) == "map"
    assert clock.phase_at(9.0) == "save"


@given(st.lists(st.floats(0, 100), min_size=1, max_size=8, unique=True), st.floats(0, 200))
def test_phase_clock_never_answers_before_the_first_step(starts: list[float], t: float) -> None:
    names = ["create", "map-bar", "save", "restore", "destroy", "draw", "fb-hash", "set-mode"]
    clock = PhaseClock({n: (s, s + 1) for n, s in zip(names, starts, strict=False)})
    assert (clock.phase_at(t) is None) == (t < min(starts))


def test_template_hides_the_domid_and_the_physmap_offset() -> None:
    path = "/local/domain/0/device-model/7/physmap/2000000/start_addr"
    assert template(path) == "/local/domain/0/device-model/$DOMID/physmap/*/start_addr"
    assert template("/local/domain/7/memory/target") == "/local/domain/$DOMID/memory/target"
    # Hard-coded dom0 paths stay explicit even for a device model whose home is dom0's tree.
    assert template(path, 0) == "/local/domain/0/device-model/$DOMID/physmap/*/start_addr"


@pytest.mark.parametrize("home", [0, 9])
def test_the_state_node_is_under_the_device_models_own_home(home: int) -> None:
    state = f"/local/domain/{home}/device-model/7/state"
    assert template(state, home) == "~/device-model/$DOMID/state"
    # Someone else's state node, or the toolstack's view of it, stays absolute.
    assert template(state, home + 1) == f"/local/domain/{home}/device-model/$DOMID/state"
    assert template(state) == f"/local/domain/{home}/device-model/$DOMID/state"


def test_failed_requests_need_no_permission() -> None:
    recs = [
        rec(1, "DIRECTORY", "/local/domain/0/device-model/3/physmap", XL, "ENOENT"),
        rec(2, "WRITE", "/local/domain/0/device-model/3/state", DM),
    ]
    perms = needed(recs)
    # docs/qemu-physmap.md, 'Start-up and readiness': the device model names its state node relative
    # to its home.
    assert [str(p) for p in perms] == ["w ~/device-model/$DOMID/state"]
    assert all(p.own_home and not p.dom0_owned and not p.physmap for p in perms)
    (seen,) = needed([rec(3, "READ", "/local/domain/0/device-model/3/state", XL)])
    assert str(seen) == "r /local/domain/0/device-model/$DOMID/state"
    assert seen.dom0_owned and not seen.own_home


def test_a_stub_device_models_state_node_is_in_its_own_tree() -> None:
    stub: dict[str, Any] = {"domid": 9, "priv": False, "guest": True, "rule": "owner"}
    (p,) = needed([rec(1, "WRITE", "/local/domain/9/device-model/3/state", DM, **stub)])
    assert str(p) == "w ~/device-model/$DOMID/state"
    assert p.own_home and not p.dom0_owned and not p.physmap


def _observed(error: str | None = None, failed: str | None = None, ok: bool = True) -> Observed:
    case = Case("compat", "stdvga")
    h = pattern_sha256("stdvga", case.seed) if ok else "0" * 64
    return Observed(
        fb_sha256_guest_saved=h,
        fb_sha256_dm_saved=h,
        fb_sha256_dm_restored=h,
        fb_sha256_guest_restored=h,
        error=error,
        failed_step=failed,
    )


@pytest.mark.parametrize(
    ("error", "failed", "ok", "expected"),
    [
        (None, None, True, "intact"),
        (None, None, False, "corrupt"),
        ("device model exited", "create", True, "refused"),
        ("device model exited", "restore", True, "aborted"),
    ],
)
def test_outcome(error: str | None, failed: str | None, ok: bool, expected: str) -> None:
    case = Case("compat", "stdvga")
    seen = _observed(error, failed, ok)
    assert outcome(seen, evaluate(case, seen, None, 1.0)) == expected


def test_build_counts_physmap_requests_per_principal_and_phase() -> None:
    case = Case("compat", "stdvga")
    seen = _observed()
    seen.spans = {
        "create": (0.0, 1.0),
        "map-bar": (2.0, 3.0),
        "save": (4.0, 5.0),
        "restore": (6.0, 7.0),
    }
    recs = [
        rec(2.5, "WRITE", "/local/domain/0/device-model/3/physmap/2000000/size", DM),
        rec(4.5, "READ", "/local/domain/0/device-model/3/physmap/2000000/size", XL),
        rec(6.5, "WRITE", "/local/domain/0/device-model/3/physmap/2000000/size", XL),
        rec(
            6.6,
            "WRITE",
            "/local/domain/3/data",
            ["x"],
            "EACCES",
            guest=True,
            priv=False,
            domid=3,
            rule="default:n",
        ),
    ]
    s = build(case, seen, evaluate(case, seen, None, 1.0), recs)
    dm, ts, guest = (s.principals[k] for k in ("device-model", "toolstack", "guest"))
    assert (dm.physmap_ops, ts.physmap_ops, guest.physmap_ops) == (1, 2, 0)
    assert dm.by_phase == {"map": {"WRITE": 1}}
    assert guest.denied_ops == 1 and guest.privileged_ops == 0
    assert s.round_trips == {"save": 1, "restore": 2}
    assert [e[1] for e in s.restore_events] == ["toolstack", "guest"]
    assert any(p.physmap and p.dom0_owned and p.access == "w" for p in s.needed["device-model"])
    js = s.as_json()
    assert js["outcome"] == "intact" and js["denied_ops"] == 1
    # The pictures and the report are well-formed, whatever the numbers.
    for svg in (matrix_svg([s]), ops_chart_svg([s]), sequence_svg(s)):
        ET.fromstring(svg)
    text = markdown([s], 1, "physmap-lab audit")
    assert "compat" in text and "physmap" in text
    assert cost_rows([s])[0]["restore_round_trips"] == 2
    assert least_privilege([s])["compat"]["device-model"]


def test_median() -> None:
    assert median([]) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--repeats", "0"],
        ["audit", "--mode", "fast"],
        ["audit", "--dm", "stubdom"],
        ["audit", "--toolstack", "xapi"],
    ],
)
def test_audit_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.match(r"physmap-lab( \w+)?: error: ", capsys.readouterr().err)


def test_audit_options_narrow_the_matrix() -> None:
    args = build_parser().parse_args(
        ["audit", "--mode", "new", "--dm", "restricted", "--device", "qxl", "cirrus"]
    )
    cells = matrix(
        args.toolstacks or ("libxl", "unaware"), args.modes, args.devices, args.dms, ["3.0"]
    )
    assert [(c.mode, c.device, c.restrict, c.qemu) for c in cells] == [
        ("new", "qxl", True, "3.0"),
        ("new", "cirrus", True, "3.0"),
    ] * 2


def _cell(mode: str, device: str, ok: bool, extra: list[str]) -> Any:
    """A libxl/privileged cell whose toolstack lists the physmap (ENOENT) on save and reads
    the paths in ``extra`` on restore."""
    case = Case(mode, device)
    h = pattern_sha256(device, case.seed)
    seen = Observed(
        fb_sha256_guest_saved=h,
        fb_sha256_dm_saved=h,
        fb_sha256_dm_restored=h if ok else "0" * 64,
        fb_sha256_guest_restored=h,
        derived_ptrs_valid=ok,
    )
    seen.spans = {"create": (0.0, 1.0), "save": (4.0, 5.0), "restore": (6.0, 7.0)}
    recs = [rec(4.5, "DIRECTORY", "/local/domain/0/device-model/3/physmap", XL, "ENOENT")]
    recs += [rec(6.5, "READ", path, XL) for path in extra]
    return build(case, seen, evaluate(case, seen, None, 1.0), recs)


def test_the_report_opens_with_findings_and_explains_how_the_sets_differ() -> None:
    qxl_only = "/local/domain/3/device/qxl"
    cells = [
        _cell("new", "stdvga", True, ["/local/domain/3/name"]),
        _cell("new", "qxl", True, ["/local/domain/3/name", qxl_only]),
        _cell("pointer-fixup", "stdvga", True, ["/local/domain/3/name"]),
        _cell("pointer-fixup", "qxl", False, ["/local/domain/3/name", qxl_only]),
    ]
    text = markdown(cells, 1, "physmap-lab audit")
    head = text[: text.index("## Every cell")]
    assert "## Summary of findings" in head and "## Legend" in head
    assert (
        "- **pointer-fixup** (2 cells): intact 1 (stdvga with libxl/privileged); corrupt 1" in head
    )
    assert "save: DIRECTORY /local/domain/0/device-model/3/physmap -> ENOENT" in head
    # The sets are named, and the one permission that separates them is explained.
    assert "*new toolstack set* (2)" in text and "*pointer-fixup toolstack set* (1)" in text
    assert (
        "1 permission only in new: asked for only by the qxl cell(s), which are not intact in "
        "pointer-fixup mode and so not counted there: `r /local/domain/$DOMID/device/qxl`"
    ) in text
    # A small set is listed in full, its count in the singular.
    assert "*pointer-fixup toolstack set* (1): 1 permission: `r /local/domain/$DOMID/name`" in text
    assert "1 permissions" not in text
    # The charts say what they sum; the failed request is hatched and named.
    assert "median over that mode's devices (new: stdvga, qxl" in text
    chart = ops_chart_svg(cells, physmap=True)
    ET.fromstring(chart)
    assert 'fill="url(#failed)"' in chart and ">ENOENT<" in chart and ">1 (0 ok)<" in chart


def test_the_pointer_fixup_sequence_is_drawn_for_the_cell_that_fails() -> None:
    from physmap_lab.audit.report import sequence_cell

    cells = [
        _cell("pointer-fixup", "stdvga", True, []),
        _cell("pointer-fixup", "qxl", False, []),
        _cell("new", "stdvga", True, []),
        _cell("new", "qxl", True, []),
    ]
    picked = sequence_cell(cells, "pointer-fixup")
    assert picked is not None and picked.device == "qxl"
    drawn = sequence_svg(picked)
    ET.fromstring(drawn)
    assert "derived pointers stale" in drawn
    picked = sequence_cell(cells, "new")
    assert picked is not None and picked.device == "stdvga"

"""The enforced least-privilege re-run's pure part (physmap_lab.audit.enforce)."""

from __future__ import annotations

from physmap_lab.audit.enforce import (
    RESTORE_STUBDOM,
    STUBDOM,
    STUBDOM_NO_PHYSMAP,
    EnforcedCell,
    Variant,
    as_json,
    conclusions,
    expected,
    plan,
)
from physmap_lab.audit.privilege import Permission
from physmap_lab.auditlog import Peer, XenstoreRequest, classify_peer

DM = "/local/domain/0/device-model/$DOMID"
#: In the device model's own tree (docs/qemu-physmap.md, 'Start-up and readiness'), stub-owned in a
#: stub (docs/qemu-physmap.md, 'Stub domains').
STATE = Permission("w", "~/device-model/$DOMID/state", False, False)
PHYS_R = Permission("r", f"{DM}/physmap", True, True)
PHYS_W = Permission("w", f"{DM}/physmap/*/size", True, True)
NAME = Permission("r", "/local/domain/$DOMID/name", False, False)
DERIVED = {"new": [STATE], "compat": [STATE, PHYS_R, PHYS_W]}


def test_plan_withholds_exactly_the_physmap_permissions() -> None:
    variants = plan(DERIVED, ["stdvga"])
    assert [(v.mode, v.kind) for v in variants] == [
        ("compat", "stubdom"),
        ("compat", "stubdom-no-physmap-grant"),
        ("compat", "restore-in-stubdom"),
        ("compat", "restore-in-stubdom-no-physmap-grant"),
        ("new", "stubdom"),
    ]
    for v in variants:
        # The device model's own tree needs no grant; everything else derived is granted.
        assert sorted([*v.grants, *v.withheld]) == sorted(
            str(p) for p in DERIVED[v.mode] if p != STATE
        )
        assert all("/physmap" in w for w in v.withheld)
        assert not any(g.startswith("~") for g in [*v.grants, *v.withheld])
    assert plan({"new": [STATE]}, ["qxl"])[0].grants == ()
    assert plan({"new": [STATE, NAME]}, ["qxl"])[0].grants == (str(NAME),)
    assert plan({}, ["qxl"]) == []


def test_privileged_only_ops_are_not_granted() -> None:
    intro = Permission("introduce", "(no path)", False, False)
    (v,) = plan({"new": [NAME, intro]}, ["stdvga"])
    assert v.grants == (str(NAME),)


def test_the_json_shows_the_derived_set_and_what_was_granted() -> None:
    doc = as_json(DERIVED, [])
    assert doc["derived"]["new"] == [str(STATE)]
    assert doc["granted"]["new"] == []
    assert sorted(doc["derived"]["compat"]) == sorted(str(p) for p in DERIVED["compat"])
    assert sorted(doc["granted"]["compat"]) == sorted([str(PHYS_R), str(PHYS_W)])


def test_the_xl_options_of_a_variant() -> None:
    v = Variant("compat", "stdvga", RESTORE_STUBDOM, (str(PHYS_R),), ())
    assert v.xl_args("create") == []
    assert v.xl_args("restore") == ["--dm-stubdom", "--dm-grant", str(PHYS_R)]
    assert v.xl_args("save") == []
    bare = Variant("new", "qxl", STUBDOM, (), ())
    assert bare.xl_args("create") == ["--dm-stubdom", "--dm-no-grants"]


def test_expected_outcomes() -> None:
    assert expected(STUBDOM, "new") == "intact"
    assert expected(RESTORE_STUBDOM, "compat") == "intact"
    assert expected(STUBDOM, "compat") == "aborted"
    assert expected(STUBDOM_NO_PHYSMAP, "compat") == "aborted"


def test_a_device_model_on_a_stub_socket_is_still_the_device_model() -> None:
    r = XenstoreRequest(
        1.0, 3, 4, False, "WRITE", ("/x",), 0, "OK", None,
        Peer(10, ("/venv/bin/qemu-model", "--domid", "3"), guest=True),
    )  # fmt: skip
    assert classify_peer(r.peer.cmdline).value == "device-model"


def _cell(v: Variant, outcome: str, denied: int, keys: int = 0) -> EnforcedCell:
    return EnforcedCell(
        v, outcome, expected(v.kind, v.mode), outcome == "intact",
        {f"k{i}": "v" for i in range(keys)}, 2, 0, [5], 0, denied, {}, None,
    )  # fmt: skip


def test_conclusions_follow_the_cells() -> None:
    new, c_full, c_none, c_restore, c_restore_none = (
        plan(DERIVED, ["stdvga"])[i] for i in (4, 0, 1, 2, 3)
    )
    cells = [
        _cell(new, "intact", 0),
        _cell(c_full, "aborted", 0),
        _cell(c_none, "aborted", 3),
        _cell(c_restore, "intact", 0, keys=3),
        _cell(c_restore_none, "aborted", 1, keys=3),
    ]
    found = conclusions(DERIVED, cells)
    assert all(found.values()), found
    cells[0] = _cell(new, "intact", 1)
    assert conclusions(DERIVED, cells)["new_passes_in_a_stub_with_exactly_its_set"] is False
    # A new-mode set that reached into dom0's tree would be caught.
    dom0_state = Permission("w", f"{DM}/state", True, False)
    found = conclusions({**DERIVED, "new": [dom0_state]}, cells)
    assert found["new_set_has_nothing_under_dom0s_tree"] is False
    assert found["new_set_has_nothing_for_the_physmap"] is True
    assert set(conclusions({}, []).values()) == {None}

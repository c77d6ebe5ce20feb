"""Pure parts of the audit's migration cells: phases across two hosts, who touched the physmap
keys where, the failing cell beside its save/restore twin, and the report naming the hosts."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from physmap_lab.audit.migrate import (
    DESTINATION,
    SOURCE,
    HostLogs,
    build_cell,
    failure_line,
    match_restore,
    migration_matrix,
    outcome,
    phase_marks,
)
from physmap_lab.audit.migrate_report import markdown, migration_table
from physmap_lab.audit.scenario import Scenario, build
from physmap_lab.auditlog import (
    HypercallRecord,
    Peer,
    ToolstackRecord,
)
from physmap_lab.demo import Case, Observed, evaluate, pattern_sha256
from physmap_lab.migration import MigrationCase
from tests.physmap_lab.test_audit import rec

SRC_DOMID, DST_DOMID = 1, 4
SRC_DM = ["qemu-model", "--domid", str(SRC_DOMID)]
DST_DM = ["qemu-model", "--domid", str(DST_DOMID)]
XL = ["xl-sim", "migrate"]
AUDIT = ["physmap-lab", "audit"]
ASSERTION = "xenforeignmemory_map2: Assertion `addr == NULL && flags == 0' failed."


xs = rec  # an audit record of xenstored-sim


def call(t: float, name: str, domid: int) -> HypercallRecord:
    return HypercallRecord(t, 1, name, domid, "ok", Peer(1, tuple(XL)))


def key(domid: int, leaf: str = "start_addr") -> str:
    return f"/local/domain/0/device-model/{domid}/physmap/2000000/{leaf}"


def spans(failed: bool = False) -> dict[str, tuple[float, float]]:
    out = {"create": (0.0, 1.0), "map": (1.0, 2.0), "migrate": (2.0, 10.0)}
    out["destroy" if failed else "verify"] = (10.0, 11.0)
    if not failed:
        out["destroy"] = (11.0, 12.0)
    return out


def migration(case: Case, *, ok: bool = True, error: str | None = None) -> MigrationCase:
    m = MigrationCase(case.mode, case.device, case.toolstack, source_host="src")
    m.destination_host = "dst"
    m.source_domid = SRC_DOMID
    m.error = error
    m.migrated = m.ok = error is None and ok
    m.spans = spans(failed=error is not None)
    if error is None:
        m.destination_domid = DST_DOMID
        h = pattern_sha256(case.device, case.seed)
        m.fb_sha256_expected = m.fb_sha256_guest = h
        m.fb_sha256_dm = h
        m.derived_ptrs_valid = ok if case.device == "qxl" else None
        m.precopy_rounds, m.pages_sent, m.downtime_s, m.total_s = 2, 9000, 0.4, 8.0
    if case.mode == "compat" and case.toolstack == "libxl":
        keys = {"physmap/2000000/start_addr": "f0000000"}
        m.physmap_keys = {"src": keys, "dst": keys}
    return m


def compat_logs(*, planted_late: bool = False) -> dict[str, HostLogs]:
    """A compat migration with libxl: the source device model writes the keys when the guest
    maps the BAR, the source toolstack reads them after the suspend, the destination toolstack
    plants them and spawns the device model, which reads them; the audit reads them too."""
    src = HostLogs(
        [
            xs(1.5, "WRITE", key(SRC_DOMID), SRC_DM),
            xs(2.5, "READ", f"/local/domain/{SRC_DOMID}/name", XL),
            xs(6.5, "READ", key(SRC_DOMID), XL),
            xs(9.5, "RM", f"/local/domain/0/device-model/{SRC_DOMID}", XL),
        ],
        [call(6.0, "domain_pause", SRC_DOMID)],
    )
    plant = 7.6 if planted_late else 7.2
    dst = HostLogs(
        [
            xs(3.0, "READ", "/local/domain/0/name", XL),  # the receiver starting, in precopy
            xs(7.1, "WRITE", f"/local/domain/{DST_DOMID}/name", XL),
            xs(plant, "WRITE", key(DST_DOMID), XL),
            xs(7.8, "READ", key(DST_DOMID), DST_DM),
            xs(10.5, "READ", key(DST_DOMID), AUDIT),  # the audit's own look: not counted
            xs(11.5, "RM", f"/local/domain/0/device-model/{DST_DOMID}", XL),
        ],
        [call(7.0, "create_domain", DST_DOMID), call(9.0, "domain_unpause", DST_DOMID)],
        [ToolstackRecord(7.5, "migrate-receive", "spawn", "ok", domid=DST_DOMID)],
    )
    return {SOURCE: src, DESTINATION: dst}


def test_phases_follow_the_suspend_the_restore_and_the_unpause() -> None:
    logs = compat_logs()
    marks = phase_marks(spans(), logs[SOURCE], logs[DESTINATION], SRC_DOMID)
    assert marks == {
        "boot": 0.0,
        "map": 1.0,
        "precopy": 2.0,
        "stop-copy": 6.0,
        "restore": 7.0,
        "handover": 9.0,
        "verify": 10.0,
        "destroy": 11.0,
    }
    # Another domain's pause is not this migration's suspend.
    other = HostLogs(logs[SOURCE].xenstore, [call(6.0, "domain_pause", SRC_DOMID + 1)])
    assert "stop-copy" not in phase_marks(spans(), other, logs[DESTINATION], SRC_DOMID)


def test_a_compat_cell_names_the_host_principal_and_phase_of_every_physmap_request() -> None:
    case = Case("compat", "stdvga")
    cell = build_cell(case, migration(case), compat_logs())
    got = [(r.host, r.principal, r.phase, r.op) for r in cell.physmap_requests]
    assert got == [
        (SOURCE, "device-model", "map", "WRITE"),
        (SOURCE, "toolstack", "stop-copy", "READ"),
        (DESTINATION, "toolstack", "restore", "WRITE"),
        (DESTINATION, "device-model", "restore", "READ"),
    ]
    # The guest's domid differs from host to host; the path names it $DOMID on both.
    assert {r.path for r in cell.physmap_requests} == {
        "/local/domain/0/device-model/$DOMID/physmap/2000000/start_addr"
    }
    assert cell.physmap_ops == {
        SOURCE: {"toolstack": 1, "device-model": 1, "guest": 0},
        DESTINATION: {"toolstack": 1, "device-model": 1, "guest": 0},
    }
    # The audit's own read in verify is left out; the destination's other requests count.
    assert cell.xenstore_ops[DESTINATION]["toolstack"] == 4
    assert cell.planted_before_dm is True
    assert (cell.outcome, cell.expected, cell.fb_hash_matches) == ("intact", "intact", True)
    js = cell.as_json()
    assert all(r["host"] in (SOURCE, DESTINATION) for r in js["physmap_requests"])
    assert all(a["host"] in (SOURCE, DESTINATION) for a in js["access"])
    assert {a["phase"] for a in js["access"]} >= {"precopy", "handover", "destroy"}
    assert js["hosts"] == {SOURCE: "src", DESTINATION: "dst"}
    assert "verify" not in {a["phase"] for a in js["access"]}


def test_keys_planted_after_the_device_model_started_are_flagged() -> None:
    case = Case("compat", "stdvga")
    cell = build_cell(case, migration(case), compat_logs(planted_late=True))
    assert cell.planted_before_dm is False


def test_stale_derived_pointers_make_a_corrupt_cell() -> None:
    """pointer-fixup leaves QXL's derived pointers stale on the destination as on restore: the
    screen hashes match, the pointers do not (QMP x-physmap-info)."""
    case = Case("pointer-fixup", "qxl")
    cell = build_cell(case, migration(case, ok=False), {})
    assert (cell.outcome, cell.expected) == ("corrupt", "corrupt")
    assert cell.fb_hash_matches and cell.pointers_valid is False
    assert markdown([cell], "x").count("| corrupt | yes | no |") == 1


def test_new_mode_cell_has_no_physmap_request_on_either_host() -> None:
    case = Case("new", "qxl")
    logs = compat_logs()
    keep = HostLogs([r for r in logs[SOURCE].xenstore if "physmap" not in r.paths[0]])
    cell = build_cell(case, migration(case), {SOURCE: keep, DESTINATION: HostLogs()})
    assert cell.physmap_requests == [] and cell.planted_before_dm is None
    assert cell.keys_carried == cell.keys_planted == {}
    text = markdown([cell], "physmap-lab audit --migrate")
    assert "no principal on either host touches the physmap keys" in text


@pytest.mark.parametrize(
    ("error", "ok", "spans_of", "want"),
    [
        (None, True, spans(), "intact"),
        (None, False, spans(), "corrupt"),
        ("the receiver could not restore", False, spans(failed=True), "aborted"),
        ("xl-sim create: no", False, {"create": (0.0, 1.0)}, "refused"),
    ],
)
def test_outcome(error: str | None, ok: bool, spans_of: Any, want: str) -> None:
    m = MigrationCase("compat", "stdvga", "libxl", ok=ok, error=error, spans=spans_of)
    assert outcome(m) == want


def _restore_twin(case: Case, dm_result: str, error: str | None) -> Scenario:
    """The save/restore cell of ``case``: its restored device model (domid 7) lists the
    physmap and gets ``dm_result``."""
    seen = Observed(error=error, failed_step="restore" if error else None)
    seen.spans = {"create": (0.0, 1.0), "save": (4.0, 5.0), "restore": (6.0, 7.0)}
    recs = [
        xs(
            6.5,
            "DIRECTORY",
            "/local/domain/0/device-model/7/physmap",
            ["qemu-model", "--domid", "7"],
            dm_result,
        )
    ]
    return build(case, seen, evaluate(case, seen, None, 1.0), recs)


def _unaware_cell(dm_result: str, dm_line: str) -> Any:
    case = Case("compat", "stdvga", "unaware")
    error = (
        f"xl-sim: error: migration of domain 1 to 127.0.0.1:4242 failed: the receiver could "
        f"not restore the domain; the domain runs on here; destination: qemu-model: {dm_line}"
    )
    logs = {
        SOURCE: HostLogs([], [call(6.0, "domain_pause", SRC_DOMID)]),
        DESTINATION: HostLogs(
            [
                xs(7.1, "WRITE", f"/local/domain/{DST_DOMID}/name", XL),
                xs(
                    7.8,
                    "DIRECTORY",
                    f"/local/domain/0/device-model/{DST_DOMID}/physmap",
                    DST_DM,
                    dm_result,
                ),
            ]
        ),
    }
    return case, build_cell(case, migration(case, error=error), logs)


RESTORE_ERROR = (
    "xl-sim restore /tmp/x.img: the device model of domain 7 (pid 9) exited during start-up; "
    "its log /tmp/dm/7.log ends with:\nqemu-model[d7]: machine up: mode=compat\n"
    f"qemu-model: {ASSERTION}"
)


def test_compat_without_the_keys_fails_as_its_restore_cell() -> None:
    case, cell = _unaware_cell("ENOENT", ASSERTION)
    assert (cell.outcome, cell.expected) == ("aborted", "aborted")
    assert cell.failure == failure_line(RESTORE_ERROR) == ASSERTION
    assert cell.keys_carried == {} and cell.planted_before_dm is None
    m = match_restore(cell, _restore_twin(case, "ENOENT", RESTORE_ERROR))
    assert m.matches, m
    assert m.dm_requests == ["DIRECTORY /local/domain/0/device-model/$DOMID/physmap -> ENOENT"]
    cell.restore_match = m
    text = markdown([cell], "physmap-lab audit --migrate")
    assert "1 of 1 failing migration cell(s) fail as their save/restore cell does" in text


@pytest.mark.parametrize(
    ("dm_result", "dm_line", "restore_result", "restore_error"),
    [
        ("ENOENT", "other words", "ENOENT", RESTORE_ERROR),  # another failure
        ("OK", ASSERTION, "ENOENT", RESTORE_ERROR),  # other requests
        ("ENOENT", ASSERTION, "ENOENT", None),  # the restore did not fail
    ],
)
def test_a_different_failure_does_not_match(
    dm_result: str, dm_line: str, restore_result: str, restore_error: str | None
) -> None:
    case, cell = _unaware_cell(dm_result, dm_line)
    assert not match_restore(cell, _restore_twin(case, restore_result, restore_error)).matches


def test_the_migration_matrix() -> None:
    cases = migration_matrix(
        ("libxl", "unaware"), ("compat", "new", "pointer-fixup"), ("stdvga", "cirrus", "qxl")
    )
    assert len(cases) == 12 == len(set(cases))
    assert {(c.mode, c.device) for c in cases if c.toolstack == "unaware"} == {
        ("compat", d) for d in ("stdvga", "cirrus", "qxl")
    }
    assert not any(c.restrict for c in cases)
    assert migration_matrix(("unaware",), ("new",), ("qxl",)) == []


def test_the_report_names_the_host_of_every_request() -> None:
    case = Case("compat", "stdvga")
    cell = build_cell(case, migration(case), compat_logs())
    text = markdown([cell], "physmap-lab audit --migrate")
    rows = [line for line in text.splitlines() if "`WRITE" in line or "`READ" in line]
    assert len(rows) == 4
    assert [r.split(" | ")[1] for r in rows] == [
        "source (src)",
        "source (src)",
        "destination (dst)",
        "destination (dst)",
    ]
    assert migration_table([cell]).row_count == 1


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 40))
def test_every_counted_request_is_in_one_host_and_phase(rng: random.Random, n: int) -> None:
    """Random requests on both hosts: each one in the window is counted once, on its own host,
    in a phase of the migration, and the per-host totals agree with the groups."""
    case = Case("compat", "cirrus")
    base = compat_logs()
    logs = {}
    for host, dm in ((SOURCE, SRC_DM), (DESTINATION, DST_DM)):
        extra = [
            xs(
                rng.uniform(0.0, 12.0),
                rng.choice(["READ", "WRITE", "DIRECTORY"]),
                rng.choice([key(3), "/local/domain/3/name", "/vm/x"]),
                rng.choice([dm, XL]),
                rng.choice(["OK", "ENOENT"]),
            )
            for _ in range(n)
        ]
        logs[host] = HostLogs(
            [*base[host].xenstore, *extra], base[host].hypercalls, base[host].toolstack
        )
    cell = build_cell(case, migration(case), logs)
    for host in (SOURCE, DESTINATION):
        grouped = sum(a.n for a in cell.access if a.host == host)
        assert grouped == sum(cell.xenstore_ops[host].values())
        listed = [r for r in cell.physmap_requests if r.host == host]
        assert len(listed) == sum(cell.physmap_ops[host].values())
    assert all(a.phase != "verify" for a in cell.access)
    times = [r.t for r in cell.physmap_requests]
    assert times == sorted(times)

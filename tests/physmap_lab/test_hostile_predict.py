"""The hostile audit's predictor: C xenstored's permission rules and privcmd restriction."""

from __future__ import annotations

from typing import Any

from physmap_lab.audit.hostile.configs import CONFIGS
from physmap_lab.audit.hostile.predict import (
    NO_EVENT,
    Principal,
    learns_of,
    perm_for,
    predict,
    touched,
)
from physmap_lab.audit.hostile.script import Host, steps

DOM0 = Principal("dom0")
STUB = Principal("domain", 7, target=6, hypervisor_to=6)
CLOSED = Principal("none", hypervisor_to=6)

ACLS = {
    "/": ["n0"],
    "/local": ["n0"],
    "/local/domain": ["n0"],
    "/local/domain/1": ["n0", "r1"],
    "/local/domain/1/data": ["b1"],
    "/local/domain/1/data/secret": ["n1"],
    "/local/domain/6": ["n0", "r6"],
    "/local/domain/6/data/secret": ["n6"],
    "/local/domain/0": ["n0"],
    "/local/domain/0/device-model": ["n0"],
    "/local/domain/0/device-model/6": ["n0"],
    "/local/domain/0/device-model/6/physmap": ["n0", "b7"],
    "/local/domain/0/device-model/6/physmap/2000000": ["n0", "b7"],
    "/local/domain/0/device-model/6/physmap/2000000/start_addr": ["n0", "b7"],
    "/local/domain/7": ["n0", "r7"],
    "/local/domain/7/device-model": ["n0", "r7"],
    "/local/domain/7/device-model/6": ["n7", "r6"],
    "@introduceDomain": ["n0"],
}


def _p(p: Principal, step: dict[str, Any]) -> tuple[bool, str | None]:
    got = predict(p, step, ACLS, node_quota=1000)
    return got.succeeded, got.errno


def test_perm_for_follows_c_perm_for_conn() -> None:
    assert perm_for(DOM0, ["n5"]) == 7
    assert perm_for(STUB, ["n7"]) == 7  # owner
    assert perm_for(STUB, ["n6"]) == 7  # its SET_TARGET domain's node
    assert perm_for(STUB, ["n0", "r7", "w7"]) == 1  # the first entry naming it wins
    assert perm_for(STUB, ["n0", "w6"]) == 2  # an entry for its target counts too
    assert perm_for(STUB, ["r0", "w3"]) == 1  # nobody named: the owner entry's letter
    assert perm_for(Principal("domain", 3), ["b0", "n3"]) == 0


def test_xenstore_attacks() -> None:
    read = {"attack": "xs-read", "path": "/local/domain/1/data/secret"}
    assert _p(DOM0, read) == (True, None)
    assert _p(STUB, read) == (False, "EACCES")
    assert _p(CLOSED, read) == (False, "EBADF")
    # The stub owns its target's nodes.
    assert _p(STUB, {"attack": "xs-read", "path": "/local/domain/6/data/secret"}) == (True, None)
    perms = {"attack": "xs-set-perms", "path": "/local/domain/6/data/secret", "perms": ["n7"]}
    assert _p(STUB, perms) == (True, None)
    perms["path"] = "/local/domain/1/data/secret"
    assert _p(STUB, perms) == (False, "EACCES")
    # A missing node under a directory it may not read is EACCES, not ENOENT.
    assert _p(STUB, {"attack": "xs-read", "path": "/local/domain/1/nothing"}) == (False, "EACCES")
    assert _p(STUB, {"attack": "xs-read", "path": "/local/domain/1/data/x"}) == (False, "ENOENT")


def test_privileged_only_and_quota() -> None:
    for attack in ({"attack": "introduce", "domid": 9}, {"attack": "release", "domid": 1}):
        assert _p(DOM0, attack) == (True, None)
        assert _p(STUB, attack) == (False, "EACCES")
        assert _p(CLOSED, attack) == (False, "EBADF")
    fill = {"attack": "quota-fill", "path": "device-model/6/hostile", "count": 1010}
    assert _p(DOM0, fill) == (True, None)
    assert _p(STUB, fill) == (False, "ENOSPC")
    fill["count"] = 10
    assert _p(STUB, fill) == (True, None)


def test_physmap_and_foreign_map() -> None:
    entry = {"offset": "2000000", "start_addr": "200000", "size": "1000000", "name": "vga.vram"}
    own = {"attack": "physmap-own", "domid": 6, "entries": [entry]}
    other = {"attack": "physmap-plant", "domid": 1, "entries": [entry]}
    assert _p(STUB, own) == (True, None)  # granted on its own guest's physmap
    assert _p(STUB, other) == (False, "EACCES")
    assert _p(DOM0, other) == (True, None)
    fmap = {"attack": "foreign-map", "domid": 1, "gfn": 0xF0000, "pages": 1}
    assert _p(DOM0, fmap) == (True, None)
    assert _p(STUB, fmap) == (False, "EPERM")
    assert _p(CLOSED, {**fmap, "domid": 6}) == (True, None)


def test_watch_learns_only_with_read_on_the_special_node() -> None:
    assert learns_of(DOM0, ["n0"]) and not learns_of(STUB, ["n0"])
    assert learns_of(STUB, ["n0", "r7"])
    watch = {"attack": "watch", "path": "@introduceDomain"}
    assert _p(STUB, watch) == (False, NO_EVENT)
    assert _p(DOM0, watch) == (True, None)


def test_the_script_touches_what_the_predictor_reads() -> None:
    host = Host(6, 1, 2, "2000000", 16 << 20, 0xF0000000, 0xF0000, 1920000, 1000)
    script = steps(host)
    assert [s["attack"] for s in script][-1] == "release"  # the one that undoes others last
    for s in script:
        for path in touched(s, STUB):
            assert path.startswith(("/", "@"))
    assert {c.name for c in CONFIGS} >= {"compat-dom0", "new-restrict-2.10", "new-restrict-3.0"}


def test_screendump_corner_is_a_png_of_the_corner() -> None:
    import zlib

    from physmap_lab.audit.hostile.screens import corner_png, ppm_corner

    w, h = 4, 3
    pixels = bytes(range(w * h * 3))
    ppm = f"P6\n{w} {h}\n255\n".encode() + pixels
    cw, ch, rgb = ppm_corner(ppm, 2, 2)
    assert (cw, ch) == (2, 2) and rgb == pixels[0:6] + pixels[12:18]
    data = corner_png(ppm)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert raw == b"\0" + pixels[0:12] + b"\0" + pixels[12:24] + b"\0" + pixels[24:36]
    import pytest

    with pytest.raises(ValueError):
        ppm_corner(b"P5\n1 1\n255\n\0", 1, 1)


def test_a_cell_off_the_prediction_is_flagged() -> None:
    from physmap_lab.audit.hostile.predict import OK, Prediction, visible
    from physmap_lab.audit.hostile.report import verdict
    from physmap_lab.audit.hostile.runner import AttackCell

    cell = AttackCell("c", "xs-read", "read", "succeeded", None, OK, {}, effect=True)
    cell.expected_effect = visible("new", False, "xs-read", True)
    assert cell.as_predicted and verdict(cell) == "succeeded"
    cell.effect = False  # allowed, but the victim's side does not show it
    assert not cell.as_predicted and verdict(cell) == "allowed, no effect"
    refused = AttackCell(
        "c", "xs-read", "read", "refused", "EPERM", Prediction(False, "EACCES"), {}
    )
    assert not refused.as_predicted  # the wrong errno
    assert not visible("compat", True, "physmap-own", True)
    assert visible("compat", False, "physmap-own", True)
    assert not visible("new", False, "physmap-plant", True)
    assert not visible("compat", False, "quota-fill", True)


def test_a_fill_hits_the_node_size_of_its_directory_first() -> None:
    from physmap_lab.audit.hostile.predict import NODE_SIZE, children_bytes

    assert children_bytes(3) == len(b"n0\0n1\0n2\0")
    # 423 nodes fit in one directory under C's 2048-byte node size; a thousand do not.
    assert children_bytes(400) < NODE_SIZE < children_bytes(1000)
    fill = {"attack": "quota-fill", "path": "device-model/6/hostile", "count": 900}
    assert _p(STUB, fill) == (False, "ENOSPC")  # under the node quota, over the node size
    assert _p(DOM0, fill) == (True, None)

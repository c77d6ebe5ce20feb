"""The display devices are listed once, in ``xenhost.devices``; every program's table of
per-device behaviour is keyed by exactly those names."""

from __future__ import annotations

import ast
import pathlib
from typing import get_args

from hypervisor_sim import guest_drivers
from qemu_model.machine import DEVICES as DEVICE_MODEL_CLASSES
from qemu_model.machine import device_class
from toolstack.config import VGA_CHOICES, VIDEORAM_DEFAULT_MIB, Vga
from xenhost.devices import DEFAULT_DEVICE, DEVICE_NAMES, DISPLAY_DEVICES

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("xenhost", "xenstored_sim", "hypervisor_sim", "qemu_model", "toolstack", "physmap_lab")
REGISTRY = ROOT / "xenhost" / "devices.py"


def test_every_per_device_table_is_keyed_by_the_registry() -> None:
    names = set(DEVICE_NAMES)
    assert set(DEVICE_MODEL_CLASSES) == names
    assert set(guest_drivers.DEVICES) == names
    assert set(guest_drivers._MODE_SET) == names
    assert set(guest_drivers._DEPTHS) == names
    assert set(get_args(Vga)) == names == set(VGA_CHOICES)
    assert DEFAULT_DEVICE in names


def test_the_device_model_shows_the_registered_ids() -> None:
    for name in DEVICE_MODEL_CLASSES:
        cls = device_class(name)
        d = DISPLAY_DEVICES[name]
        assert (d.vendor_id, d.device_id) == (cls.VENDOR_ID, cls.DEVICE_ID)
        assert VIDEORAM_DEFAULT_MIB[name] == d.videoram_default_mib


def _listings(path: pathlib.Path) -> list[int]:
    """Tuple, list and set displays, subscripts (``Literal[...]``) and dict displays whose
    string constants name every registered device: a second list of the devices."""
    found: list[int] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        named = {e.value for e in items if isinstance(e, ast.Constant)}
        if set(DEVICE_NAMES) <= named:
            found.append(node.lineno)
    return found


def test_no_other_module_lists_the_devices() -> None:
    # The hooks tables above are checked against the registry instead; toolstack.config's
    # Literal is the type of xl.cfg's vga and is checked the same way.
    allowed = {
        "hypervisor_sim/guest_drivers.py",
        "qemu_model/machine.py",
        "toolstack/config.py",
    }
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != REGISTRY and path.relative_to(ROOT).as_posix() not in allowed
        for line in _listings(path)
    ]
    assert not found, "devices listed outside xenhost/devices.py:\n" + "\n".join(found)


def test_the_check_finds_a_listing(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text('X = ("stdvga", "cirrus", "qxl")\nY = ["qxl", "stdvga"]\nZ = {"qxl": 1}\n')
    assert _listings(path) == [1]

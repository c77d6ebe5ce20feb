"""``physmap-lab demo``: save and restore a guest's framebuffer in each device-model mode.

For every case (a mode, a VGA device and a toolstack flavour) the demo drives the stack the way
an administrator and a guest would (DESIGN.md, the ``physmap-lab demo`` contract):

1. ``xl-sim create``: the toolstack builds the domain and spawns its ``qemu-model``;
2. ``xl-sim guest``: the guest maps the VGA BAR at 0xf0000000 (above 0xbffff, so compat QEMU
   tracks it: docs/qemu-physmap.md, 'When QEMU writes the keys'), sets a linear mode and draws a
   known pattern;
3. QMP ``x-physmap-info``: what the device model displays through its own pointers;
4. ``xl-sim save``: suspend, write the image, destroy the domain (as ``xl save`` does);
5. ``xl-sim restore``: a new domain and a new device model loading the saved device state;
6. QMP ``x-physmap-info`` and ``xl-sim guest fb-hash``: the framebuffer after restore, seen by
   the device model and read back by the guest; then ``xl-sim destroy``.

Each toolstack step is its own short-lived ``xl-sim`` process, as ``xl`` is, so the xenstore
audit log tells the toolstack, the device model and the guest apart.  The audit logs are read
afterwards to count who touched the physmap keys.

:mod:`.plan` holds the cases and :mod:`.verdict` judges them (the pure part); :mod:`.case`
runs one case and :mod:`.run` the whole demo (the trio shell); :mod:`.leftovers` finds what
a case left behind.
"""

from .case import (
    AFTER_RESTORE,
    BEFORE_SAVE,
    CLEANUP_LIMIT_S,
    STEP_LIMIT_S,
    XL_PROGRAM,
    DemoRun,
    Reporter,
    StepError,
    screenshot_path,
)
from .leftovers import device_models, end_processes, leftover_files
from .plan import (
    BAR_ADDR,
    BPP,
    DEFAULT_DEVICES,
    DEFAULT_MODES,
    DEFAULT_QEMU,
    DEFAULT_TOOLSTACKS,
    GUEST_MEMORY_MIB,
    HEIGHT,
    WIDTH,
    Case,
    expected_to_work,
    pattern_sha256,
    plan,
)
from .run import DemoOutcome, run_demo
from .verdict import (
    CaseResult,
    Observed,
    evaluate,
    failed_unexpectedly,
    judge,
    worked_unexpectedly,
)

__all__ = [
    "AFTER_RESTORE",
    "BAR_ADDR",
    "BEFORE_SAVE",
    "BPP",
    "CLEANUP_LIMIT_S",
    "DEFAULT_DEVICES",
    "DEFAULT_MODES",
    "DEFAULT_QEMU",
    "DEFAULT_TOOLSTACKS",
    "GUEST_MEMORY_MIB",
    "HEIGHT",
    "STEP_LIMIT_S",
    "WIDTH",
    "XL_PROGRAM",
    "Case",
    "CaseResult",
    "DemoOutcome",
    "DemoRun",
    "Observed",
    "Reporter",
    "StepError",
    "device_models",
    "end_processes",
    "evaluate",
    "expected_to_work",
    "failed_unexpectedly",
    "judge",
    "leftover_files",
    "pattern_sha256",
    "plan",
    "run_demo",
    "screenshot_path",
    "worked_unexpectedly",
]

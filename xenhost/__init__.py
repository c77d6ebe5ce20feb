"""The host contract every process of the simulated Xen host agrees on.

A leaf package: it imports nothing of ours and no trio, so every package may use it (the
dependency rule of docs/architecture.md).  :mod:`xenhost.rundir` names the files of a run
directory, :mod:`xenhost.process` finds the programs and processes serving one, and
:mod:`xenhost.devices` is the registry of the guest's display devices.
"""

from __future__ import annotations

from .devices import DEVICE_NAMES, DISPLAY_DEVICES, DisplayDevice
from .process import (
    accepts,
    device_model_domains,
    device_models,
    executable,
    spawn_detached,
    stop_device_models,
    xl_json_argv,
)
from .rundir import PRINCIPALS, RunDir

__all__ = [
    "DEVICE_NAMES",
    "DISPLAY_DEVICES",
    "PRINCIPALS",
    "DisplayDevice",
    "RunDir",
    "accepts",
    "device_model_domains",
    "device_models",
    "executable",
    "spawn_detached",
    "stop_device_models",
    "xl_json_argv",
]

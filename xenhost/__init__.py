"""The host contract every process of the simulated Xen host agrees on.

A leaf package: it imports nothing of ours and no trio, so every package may use it (the
dependency rule of docs/architecture.md).  :mod:`xenhost.rundir` names the files of a run
directory, :mod:`xenhost.process` finds the programs and processes serving one.
"""

from __future__ import annotations

from .process import accepts, device_model_domains, device_models, executable, xl_json_argv
from .rundir import PRINCIPALS, RunDir

__all__ = [
    "PRINCIPALS",
    "RunDir",
    "accepts",
    "device_model_domains",
    "device_models",
    "executable",
    "xl_json_argv",
]

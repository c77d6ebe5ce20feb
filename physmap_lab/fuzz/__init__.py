"""Fuzzers for every daemon and parser of the stack, over their real interfaces.

``generators`` makes the input (pure and seeded); ``xenstored``, ``hypervisor``, ``devicemodel``
and ``toolstack`` aim it at one process each and check that process afterwards; ``runner`` starts
private stacks and is the command line (``python -m physmap_lab.fuzz``).
"""

from .devicemodel import fuzz_qmp
from .generators import FrameMaker, HypercallFrameMaker, ImageMutator, QmpLineMaker
from .hypervisor import fuzz_hypervisor
from .report import FuzzReport
from .runner import TARGETS, main, run_targets
from .toolstack import fuzz_image_parser, fuzz_restores, leftovers, parse_image_bytes, restore_image
from .xenstored import fuzz_daemon

__all__ = [
    "TARGETS",
    "FrameMaker",
    "FuzzReport",
    "HypercallFrameMaker",
    "ImageMutator",
    "QmpLineMaker",
    "fuzz_daemon",
    "fuzz_hypervisor",
    "fuzz_image_parser",
    "fuzz_qmp",
    "fuzz_restores",
    "leftovers",
    "main",
    "parse_image_bytes",
    "restore_image",
    "run_targets",
]

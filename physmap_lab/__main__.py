"""``python -m physmap_lab``: the ``physmap-lab`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())

"""``python -m physmap_lab.fuzz``."""

import sys

from .runner import main

sys.exit(main())

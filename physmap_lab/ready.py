"""``python -m physmap_lab.ready SOCKET``: exit 0 when SOCKET accepts a connection.

The readiness probe of the compose services: each daemon is ready when its socket accepts.
"""

from __future__ import annotations

import sys

from xenhost import accepts

__all__ = ["accepts", "main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m physmap_lab.ready SOCKET", file=sys.stderr)
        return 2
    return 0 if accepts(args[0]) else 1


if __name__ == "__main__":
    sys.exit(main())

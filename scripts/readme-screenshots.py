"""Make the README's screenshots: run the demo's QXL cases with ``--screenshots`` and keep the
top-left corner of three screens (Pillow, from the test extras, does the cropping).

    .venv/bin/python scripts/readme-screenshots.py [docs/screenshots]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CROP = (0, 0, 200, 150)
KEEP = {
    "demo-new-qxl-libxl-before-save.png": "new-qxl-before-save.png",
    "demo-new-qxl-libxl-after-restore.png": "new-qxl-after-restore.png",
    "demo-pointer-fixup-qxl-libxl-after-restore.png": "pointer-fixup-qxl-after-restore.png",
}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots")
    out.mkdir(parents=True, exist_ok=True)
    program = Path(sys.executable).parent / "physmap-lab"
    with tempfile.TemporaryDirectory() as shots:
        argv = [str(program), "demo", "--mode", "new", "pointer-fixup", "--device", "qxl"]
        subprocess.run([*argv, "--screenshots", shots], check=True)
        for name, short in KEEP.items():
            with Image.open(Path(shots) / name) as img:
                img.crop(CROP).save(out / short, optimize=True)
            print(f"wrote {out / short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

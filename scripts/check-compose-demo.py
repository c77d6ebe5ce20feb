"""Check the JSON the demo printed under docker-compose, as ``make demo`` judges a run.

Every planned case ran, each restored intact exactly when it should (the demo's own verdict),
and the audit told the principals apart across containers: no physmap request is "other", and
in compat mode both the device model and the toolstack are seen on the physmap paths.
Usage: check-compose-demo.py DEMO_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from physmap_lab.demo import plan


def problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        return ['not {"runs": [...]}']
    runs: list[dict[str, Any]] = doc["runs"]
    found: list[str] = []
    want = {(c.mode, c.device, c.toolstack) for c in plan()}
    ran = {(r.get("mode"), r.get("device"), r.get("toolstack")) for r in runs}
    if ran != want:
        found.append(f"cases ran {sorted(map(str, ran))}, planned {sorted(map(str, want))}")
    for r in runs:
        case = f"{r.get('mode')}/{r.get('device')}/{r.get('toolstack')}"
        if r.get("ok") != r.get("expected_ok"):
            found.append(
                f"{case}: ok={r.get('ok')} expected {r.get('expected_ok')}: {r.get('error')}"
            )
        ops = r.get("physmap_xenstore_ops") or {}
        if ops.get("other"):
            found.append(f"{case}: {ops['other']} physmap requests from no known principal")
        if r.get("mode") == "compat" and not (ops.get("device-model") and ops.get("toolstack")):
            found.append(f"{case}: compat physmap requests not attributed: {ops}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check-compose-demo.py DEMO_JSON", file=sys.stderr)
        return 2
    path = Path(argv[1])
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"make compose: no demo result in {path}: {exc}", file=sys.stderr)
        return 1
    found = problems(doc)
    for problem in found:
        print(f"make compose: {problem}", file=sys.stderr)
    if not found:
        print(f"make compose: {len(doc['runs'])} cases as expected, principals attributed")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Print the loop-hold histograms that ``bench/loop_holds/sitecustomize.py`` wrote (one table
per process that recorded any): calls per bucket of milliseconds, total and longest.

    .venv/bin/python bench/loop_holds_report.py /tmp/holds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["main"]


def main(folder: str) -> int:
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if not data["hist"]:
            continue
        heads = [f"<={e:g}" for e in data["edges"]] + [f">{data['edges'][-1]:g}"]
        print(f"\n{path.name}: {data.get('source', '?')} (ms)")
        print(f"{'':<28}" + "".join(f"{h:>8}" for h in heads) + f"{'total':>9}{'max':>8}")
        for name, counts in sorted(data["hist"].items()):
            print(f"{name:<28}" + "".join(f"{c:>8}" for c in counts)
                  + f"{data['total_ms'][name]:>9.0f}{data['max_ms'][name]:>8.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

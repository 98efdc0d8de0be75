"""Cost of a window's distinct keys: events per second through ``Window.update`` in the Tester
(in memory, no node) when every event brings a new key into one open window, for growing key
counts. A cost per event that grows with the window's key count (as a per-window key list
rewritten for every new key did) shows as falling rates down the table.

    .venv/bin/python bench/bench_windows.py                       # 2,000 / 8,000 / 32,000 keys
    .venv/bin/python bench/bench_windows.py --keys 1000,10000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from chukcha import App, Context
from chukcha.processors.tester import Tester


def one_run(keys: int) -> float:
    """Seconds to feed ``keys`` events, each a new key of the same one-minute window."""
    app = App("bench_windows", state_dir="unused")
    window = app.window("per_minute", size=60)

    @app.processor("clicks")
    def on_click(ctx: Context, click: dict[str, Any]) -> None:
        window.update(ctx, click["page"], click["ts"], lambda n: n + 1, initial=0)

    t = Tester(app)
    events = [{"id": str(i), "page": f"p{i}", "ts": 1000.0} for i in range(keys)]
    started = time.perf_counter()
    t.feed("clicks", *events)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="2000,8000,32000",
                        help="comma-separated key counts (default 2000,8000,32000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per key count (default 3)")
    args = parser.parse_args()
    print(f"{'keys':>8}  {'median s':>9}  {'events/s':>9}")
    for keys in (int(k) for k in args.keys.split(",")):
        median = statistics.median(one_run(keys) for _ in range(args.runs))
        print(f"{keys:>8}  {median:>9.3f}  {keys / median:>9.0f}")


if __name__ == "__main__":
    main()

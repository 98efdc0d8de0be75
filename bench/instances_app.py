"""The app ``bench/bench_instances.py`` runs as processes (``chukcha run instances_app:app``).

Its name comes from ``$BENCH_APP`` (a fresh consumer group per run), its partition count from
``$BENCH_PARTITIONS``; it prints ``DONE <unix time>`` once it applied ``$BENCH_EXPECT`` events
(its share of the input), then keeps running until it is stopped.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from chukcha import App, Context

__all__ = ["app"]

_expect = int(os.environ.get("BENCH_EXPECT", "0"))
_count = 0

app = App(os.environ.get("BENCH_APP", "bench"), partitions=int(
    os.environ.get("BENCH_PARTITIONS", "4")))


@app.processor("events", key=lambda event: event["k"])
def on_event(ctx: Context, event: dict[str, Any]) -> None:
    global _count  # noqa: PLW0603 - a benchmark's counter
    ctx.set(ctx.key, ctx.get(ctx.key, 0) + event["amount"])
    _count += 1
    if _count == _expect:
        sys.stdout.write(f"DONE {time.time():.6f}\n")
        sys.stdout.flush()

"""The app of ``test_zombie_emits``: each receipt names the process that sent it; the test's
own instance sets :data:`PAUSE_FIRST` so that its first call stops the whole process (event
loop included, as SIGSTOP would) for ``PAUSE_FIRST`` seconds."""

from __future__ import annotations

import os
import time
from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["PAUSE_FIRST", "app"]

PAUSE_FIRST = 0.0

app = App("zshop", partitions=1, config=ProcessorConfig(read_timeout=0.2, changelog=True))


@app.processor("orders")
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    global PAUSE_FIRST
    if PAUSE_FIRST:
        pause, PAUSE_FIRST = PAUSE_FIRST, 0.0
        time.sleep(pause)  # the pause under test, not a wait for anything
    ctx.emit("receipts", {"id": f"r-{order['id']}", "by": os.getpid()})

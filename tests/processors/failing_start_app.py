"""An app (``chukcha run tests.processors.failing_start_app:app --etcd ...``) whose partitions
cannot start while the file named by ``$CHUKCHA_TEST_FAIL_START`` exists: the start of each
claimed partition then fails as a restore that finds no node answering does (a fault injected
into the real process; the claim, the release, the retries with backoff and the ``failing``
keys are the real ones). Removing the file lets the next try start the partition."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

from chukcha import App, Context
from chukcha.errors import ClientError
from chukcha.processors import ProcessorConfig
from chukcha.processors.group import GroupMode

__all__ = ["app"]

app = App("failing", partitions=2, config=ProcessorConfig(read_timeout=0.2, changelog=True))


@app.processor("orders", key=lambda order: order["customer"])
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    ctx.set(ctx.key, ctx.get(ctx.key, 0) + order["amount"])


_real_assigned = GroupMode.assigned


@functools.wraps(_real_assigned)
async def _assigned(self: GroupMode, partition: int, epoch: int) -> None:
    flag = os.environ.get("CHUKCHA_TEST_FAIL_START")
    if flag is not None and await asyncio.to_thread(Path(flag).exists):
        raise ClientError(f"no node answered reading 'failing.changelog.p{partition:04d}' "
                          f"(injected: {flag} exists)")
    await _real_assigned(self, partition, epoch)


GroupMode.assigned = _assigned  # type: ignore[method-assign]

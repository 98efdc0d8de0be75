"""A lease lost in the middle of a take-over cancels it: real ``chukcha run --etcd`` processes
on a real 2-node bus with real etcd. x is SIGKILLed while node b is stopped (SIGSTOP), so y's
take-over of x's partitions (a restore from the bus, which needs every node) cannot finish;
y is then stopped (SIGSTOP) past its lease and continued. Its take-over in progress must be
cancelled and y must join again at once, node b still stopped; before, the take-over held the
coordination lock, so y could neither stop its partitions nor join again until node b came
back. Once b answers, y takes every partition over and the state on the bus is exact."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from chukcha.bus.app_coordination import read_app
from chukcha.testing import EtcdServer
from tests.integration.cluster_helpers import wait_for
from tests.integration.test_app_group import (
    APP,
    CLUSTER,
    PARTITIONS,
    etcd,
    scenario,
    wait_owners,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.allow_blocking, pytest.mark.slow]

__all__ = ["etcd"]


async def test_a_lost_lease_cancels_a_take_over_in_progress(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with scenario(tmp_path, etcd, seed=17) as sc:
        x, y, shared = await sc.start_x_and_y()
        b = sc.cluster["b"]
        assert b.proc is not None and y.proc is not None
        b.proc.send_signal(signal.SIGSTOP)
        try:
            # Only what y logs from now on (it may have claimed x's partitions at the start).
            before = len(await asyncio.to_thread(y.log.read_bytes))
            assert await x.kill() == -9
            # y claims x's partitions; restoring them (an empty store) waits for node b.
            from_x = sorted(p for p, owner in shared.items() if owner == "x")

            async def taking_over() -> bool:
                log = (await asyncio.to_thread(y.log.read_bytes))[before:].decode()
                return any(f"partition {p} claimed" in log for p in from_x)

            await wait_for(taking_over, timeout=60, what="y to start taking x's partitions")
            y.proc.send_signal(signal.SIGSTOP)
            try:
                async def y_expired() -> bool:
                    view = await read_app((etcd.endpoint,), CLUSTER, APP)
                    return "y" not in view.members

                await wait_for(y_expired, timeout=30, what="y's lease to expire")
            finally:
                y.proc.send_signal(signal.SIGCONT)

            # Node b still stopped: the take-over is cancelled, y stops and joins again.
            async def joined_again() -> bool:
                log = (await asyncio.to_thread(y.log.read_bytes))[before:].decode()
                view = await read_app((etcd.endpoint,), CLUSTER, APP)
                return "y" in view.members and "take-over cancelled" in log

            await wait_for(joined_again, timeout=30,
                           what="y to cancel its take-over and join again (node b stopped)")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        await wait_owners(etcd, lambda o: len(o) == PARTITIONS and set(o.values()) == {"y"},
                          "y to own every partition")
        await sc.send_round()
        seen = await sc.receipts()
        await sc.check_end(seen)
        assert await y.terminate() == 0

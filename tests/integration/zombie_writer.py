"""A changelog writer that does not know when to stop: the worst zombie, as a process.

``python -m tests.integration.zombie_writer --etcd URL --cluster C --app A --partitions N
--partition P --node URL... --state DIR [--ttl S]`` joins the app's group in etcd as instance
``z`` (a real claim under a real lease: another instance can take its partitions only once the
lease expired), restores partition ``P``'s store from its changelog like a new owner, then
commits and publishes a changelog record for ``P`` every few milliseconds at the epoch of its
claim, through the real :class:`~chukcha.processors.changelog.Changelog` and the runner's
:class:`~chukcha.processors.busio.BusIO`, with a snapshot every 4 records whose acks of the
complete changelog chunks go through the real fenced ack path (the node refuses them once the
claim moved). Before SIGCONT each record puts ``t/zombie = "before"``; after a SIGCONT (the test
SIGSTOPs it past its lease first) it ignores that it lost the claim, as a process paused in the
middle of a batch would, and writes ``--after`` records that put ``t/zombie = "after"`` and
``t/ann = -1`` (with snapshots), then exits 0. One JSON line per event on stdout: ``assigned``
(with the epoch), ``published`` (seq, phase), ``done`` (``refused``: snapshots whose acks
the node refused).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import orjson

from chukcha import App, Client
from chukcha.bus.app_coordination import AppInstances
from chukcha.processors.busio import BusIO
from chukcha.processors.changelog import Changelog
from chukcha.processors.engine import CommitPlan
from chukcha.state.leveldb import LevelDBStore

__all__ = ["main"]


class _Claims:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.epoch: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def assigned(self, partition: int, epoch: int) -> None:
        if partition == self.partition and not self.epoch.done():
            self.epoch.set_result(epoch)

    async def revoking(self, partition: int) -> None:
        return

    async def lost(self, partition: int) -> None:
        return  # the zombie: it goes on

    async def follow(self, partitions: frozenset[int]) -> None:
        return  # no standbys here


def _say(**fields: object) -> None:
    sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> int:
    resumed = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, resumed.set)
    claims = _Claims(args.partition)
    instances = AppInstances((args.etcd,), args.cluster, args.app, "z", args.partitions,
                             listener=claims, lease_ttl=args.ttl)
    await instances.start()
    epoch = await claims.epoch
    _say(event="assigned", epoch=epoch)
    store = await asyncio.to_thread(LevelDBStore, Path(args.state))
    async with Client(args.node) as client:
        # The runner's own bus IO: real publishes and real (fenced) acks of the changelog.
        bus = BusIO(App(args.app, nodes=list(args.node)), client, {})
        changelog = Changelog(args.app, args.partition, bus, epoch=epoch, snapshot_every=4,
                              fenced=True)
        await changelog.restore_if_empty(store)
        await asyncio.to_thread(changelog.load, store)
        written_after = 0
        while written_after < args.after:
            phase = "after" if resumed.is_set() else "before"
            puts = {b"t/zombie": orjson.dumps(phase)}
            if phase == "after":
                puts[b"t/ann"] = b"-1"
                written_after += 1
            extra, deletes = changelog.stage(CommitPlan(puts, [], 1))
            await asyncio.to_thread(store.write, {**puts, **extra}, deletes, sync=True)
            changelog.committed()
            await changelog.publish()
            _say(event="published", seq=changelog.seq, phase=phase)
            if phase == "before":
                await asyncio.sleep(0.05)
    _say(event="done", refused=changelog.acks_refused)
    sys.stdout.flush()
    os._exit(0)  # no goodbye to etcd: the zombie just ends


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--etcd", "--cluster", "--app", "--state"):
        p.add_argument(name, required=True)
    p.add_argument("--node", action="append", required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--partition", type=int, required=True)
    p.add_argument("--after", type=int, default=40)
    p.add_argument("--ttl", type=int, default=2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

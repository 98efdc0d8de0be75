"""One instance of an app in etcd, as a process the tests can SIGKILL/SIGSTOP.

``python -m tests.integration.app_member --etcd URL --cluster C --app A --instance I
--partitions P [--ttl S] [--standbys N [--ready P,...]]``: joins, prints one JSON line per
partition event (``assigned``, ``revoking``, ``lost``, ``standby``) and runs until SIGTERM (a
graceful leave) or SIGKILL. ``--ready``: the partitions whose copy here says it caught up as
soon as this instance follows them (the others never do).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import orjson

from chukcha.bus.app_coordination import AppInstances

__all__ = ["main"]


class _Printer:
    def __init__(self, ready: frozenset[int]) -> None:
        self.ready = ready
        self.instances: AppInstances | None = None

    async def assigned(self, partition: int, epoch: int) -> None:
        _say("assigned", partition, epoch)

    async def revoking(self, partition: int) -> None:
        _say("revoking", partition)

    async def lost(self, partition: int) -> None:
        _say("lost", partition)

    async def follow(self, partitions: frozenset[int]) -> None:
        for p in sorted(partitions):
            _say("standby", p)
            if p in self.ready and self.instances is not None:
                self.instances.standby_ready(p)


def _say(event: str, partition: int, epoch: int = 0) -> None:
    line = orjson.dumps({"event": event, "partition": partition, "epoch": epoch})
    sys.stdout.write(line.decode() + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    printer = _Printer(frozenset(int(p) for p in args.ready.split(",") if p))
    instances = AppInstances((args.etcd,), args.cluster, args.app, args.instance,
                             args.partitions, listener=printer, lease_ttl=args.ttl,
                             standbys=args.standbys)
    printer.instances = instances
    await instances.start()
    failed = asyncio.ensure_future(instances.wait_failed())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([failed, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await instances.stop()
    if failed.done():
        sys.stdout.write(f"failed: {failed.result()}\n")
        return 1
    failed.cancel()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--etcd", "--cluster", "--app", "--instance"):
        p.add_argument(name, required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--standbys", type=int, default=0)
    p.add_argument("--ready", default="")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

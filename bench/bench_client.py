"""Client benchmark: N ~200-byte JSON events through the batching producer into one node, then a
consumer reading them back.

Starts its own ``chukcha node`` subprocess (:class:`chukcha.testing.NodeProcess`) on a temporary
directory. Each run uses a fresh category: the producer sends N dict events (the client gives
each its ID and encodes it with orjson), then a consumer reads the category to its end, counts
the events, checks that every ID arrived, and commits (which acks, so the disk is freed). The
table shows the median of the runs and the range.

    .venv/bin/python bench/bench_client.py                  # 1M events, 3 runs, both send modes
    .venv/bin/python bench/bench_client.py -n 200000 --runs 5 --mode many

Modes: ``send`` awaits ``producer.send(event)`` per event; ``many`` hands the producer lists of
1,000 events (``producer.send_many``). Reading: ``raw`` counts messages in each batch without
decoding them, ``decode`` also parses every event with orjson (what a processor must do).
The benchmark process shares the machine's cores with the node, so figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from chukcha.client import Client
from chukcha.testing import NodeProcess

__all__ = ["main"]

_POOL = 10_000
_SLICE = 1_000


@dataclass(frozen=True, slots=True)
class Sample:
    phase: str
    events: int
    nbytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def make_pool() -> list[dict[str, Any]]:
    """Event dicts whose JSON, with the ID the client adds, is ~200 bytes."""
    pool = [
        {"customer": f"customer-{i % 977:05d}", "amount": i % 10_000, "currency": "EUR",
         "kind": "order", "note": "n" * 74, "seq": i}
        for i in range(_POOL)
    ]
    sample = orjson.dumps({"id": "x" * 28, **pool[0]})
    if not 190 <= len(sample) <= 210:
        raise RuntimeError(f"events are {len(sample)} bytes, not ~200")
    return pool


async def produce(client: Client, category: str, n: int, mode: str,
                  pool: list[dict[str, Any]]) -> tuple[Sample, list[str]]:
    ids: list[str] = []
    started = time.perf_counter()
    async with client.producer(category, max_batch_bytes=1 << 20, linger=0.005,
                               max_in_flight=2) as producer:
        if mode == "send":
            send = producer.send
            add = ids.append
            for i in range(n):
                add(await send(pool[i % _POOL]))
        else:
            for start in range(0, n, _SLICE):
                count = min(_SLICE, n - start)
                first = start % _POOL
                chunk = pool[first:first + count]
                if len(chunk) < count:
                    chunk += pool[:count - len(chunk)]
                ids += await producer.send_many(chunk)
    seconds = time.perf_counter() - started
    return Sample(f"produce ({mode})", n, n * 200, seconds), ids


async def consume(client: Client, category: str, n: int, decode: bool,
                  seen: set[str] | None = None) -> Sample:
    """Read ``n`` events; with ``decode`` parse each (and collect IDs in ``seen``), then ack."""
    consumer = client.consumer(category, max_batch_bytes=4 << 20)
    got = 0
    nbytes = 0
    started = time.perf_counter()
    async with consumer:
        while got < n:
            for batch in await consumer.read(timeout=30):
                nbytes += len(batch.data)
                if decode:
                    events = [orjson.loads(m) for m in batch.messages()]
                    got += len(events)
                    if seen is not None:
                        seen.update([e["id"] for e in events])
                else:
                    got += batch.data.count(b"\n")
        seconds = time.perf_counter() - started
        if decode:  # the last pass: ack everything, so the disk is freed for the next run
            while not consumer.caught_up:
                await consumer.read(timeout=1)
            await consumer.commit(consumer.positions())
    return Sample("consume (" + ("decode" if decode else "raw") + ")", got, nbytes, seconds)


async def run(args: argparse.Namespace) -> int:
    pool = make_pool()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        node = NodeProcess(Path(tmp) / "data", "bench", ["--log-level", "WARNING"])
        await node.start()
        samples: dict[str, list[Sample]] = {}
        try:
            async with Client([node.url]) as client:
                modes = ["send", "many"] if args.mode == "both" else [args.mode]
                for r in range(args.runs):
                    for mode in modes:
                        category = f"bench-{mode}-{r}"
                        s, ids = await produce(client, category, args.events, mode, pool)
                        samples.setdefault(s.phase, []).append(s)
                        raw = await consume(client, category, args.events, decode=False)
                        seen: set[str] = set()
                        dec = await consume(client, category, args.events, decode=True,
                                            seen=seen if args.verify else None)
                        for c in (raw, dec):
                            samples.setdefault(c.phase, []).append(c)
                        if args.verify and seen != set(ids):
                            print(f"LOST EVENTS in {category}: {len(set(ids) - seen)}",
                                  file=sys.stderr)
                            return 1
                        print(f"run {r + 1} {mode}: {s.rate:,.0f} ev/s in; out {raw.rate:,.0f} "
                              f"ev/s raw, {dec.rate:,.0f} ev/s decoded", file=sys.stderr)
        finally:
            await node.stop()
            node.close()
    print_table(samples, args)
    return 0


def print_table(samples: dict[str, list[Sample]], args: argparse.Namespace) -> None:
    print(f"\nchukcha client benchmark: {args.events:,} events of ~200 bytes per run, "
          f"{args.runs} runs, one node (subprocess)\n")
    header = f"{'phase':<18} {'runs':>4} {'median ev/s':>12} {'min ev/s':>12} {'max ev/s':>12}" \
             f" {'median MB/s':>11}"
    print(header)
    print("-" * len(header))
    for phase, rows in samples.items():
        rates = [s.rate for s in rows]
        mbs = statistics.median(s.nbytes / s.seconds / 1e6 for s in rows)
        print(f"{phase:<18} {len(rows):>4} {statistics.median(rates):>12,.0f} "
              f"{min(rates):>12,.0f} {max(rates):>12,.0f} {mbs:>11.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("-n", "--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", choices=["send", "many", "both"], default="both")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not check that every ID came back")
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

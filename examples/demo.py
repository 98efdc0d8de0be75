"""``make demo``: a standalone node, the orders app, orders sent with duplicates, the totals.

1. starts ``chukcha node`` (a subprocess) on a temporary directory;
2. starts ``chukcha run examples.orders:app`` (a subprocess) against it;
3. sends sample orders, then sends some of them AGAIN (same IDs: the bus stores both copies);
4. waits until a receipt for every order is on the bus, stops the app with SIGTERM;
5. prints the per-customer totals from the app's LevelDB state: every order counted once.

    .venv/bin/python -m examples.demo
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from chukcha import Client
from chukcha.loop import run_loop
from chukcha.processors.engine import read_state_table
from chukcha.testing import spawn_node

__all__ = ["ORDERS", "main"]

ROOT = Path(__file__).resolve().parents[1]

ORDERS: list[dict[str, Any]] = [
    {"id": f"order-{i:03d}", "customer": customer, "amount": amount}
    for i, (customer, amount) in enumerate([
        ("ann", 120), ("bob", 40), ("cid", 700), ("ann", 35), ("dan", 990), ("bob", 15),
        ("cid", 410), ("ann", 880), ("dan", 5), ("eve", 60), ("bob", 250), ("eve", 75),
    ])
]


async def wait_receipts(client: Client, ids: set[str], timeout: float = 60.0) -> int:
    """Read ``receipts`` until every order has one; returns how many receipts were read."""
    seen: set[str] = set()
    count = 0
    consumer = client.consumer("receipts")
    try:
        async with asyncio.timeout(timeout):
            while not ids <= seen:
                for batch in await consumer.read():
                    for message in batch.messages():
                        seen.add(orjson.loads(message)["order"])
                        count += 1
    finally:
        await consumer.stop()
    return count


def read_state(state_dir: Path) -> dict[str, Any]:
    return read_state_table(state_dir)


async def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="chukcha-demo-") as tmp:
        base = Path(tmp)
        async with spawn_node(base / "node", "demo", ["--log-level", "WARNING"]) as node:
            print(f"1. node 'demo' serving {node.url} (data in {base / 'node'})")
            state_dir = base / "billing-state"
            log_path = base / "billing.log"
            log_fd = await asyncio.to_thread(
                os.open, log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
            )
            try:
                app = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "chukcha", "run", "examples.orders:app",
                    "--node", node.url, "--state-dir", str(state_dir),
                    stdout=log_fd, stderr=log_fd, cwd=ROOT,
                )
            finally:
                os.close(log_fd)
            print("2. chukcha run examples.orders:app  (group 'billing', state in "
                  f"{state_dir.name}/)")
            try:
                async with Client([node.url]) as client:
                    await client.send("orders", ORDERS)
                    duplicates = ORDERS[::2]
                    await client.send("orders", duplicates)  # a producer retry: same IDs
                    print(f"3. sent {len(ORDERS)} orders, then {len(duplicates)} of them again "
                          f"({len(ORDERS) + len(duplicates)} messages on the bus)")
                    receipts = await wait_receipts(client, {o["id"] for o in ORDERS})
                    print(f"4. {receipts} receipts emitted (one per order, none for the "
                          "duplicates)")
            finally:
                if app.returncode is None:
                    app.send_signal(signal.SIGTERM)
                code = await app.wait()
            if code != 0:
                print(f"the app exited with {code}; its log:")
                print(await asyncio.to_thread(log_path.read_text))
                return 1
            table = await asyncio.to_thread(read_state, state_dir)
    expected: dict[str, int] = {}
    for o in ORDERS:
        expected[o["customer"]] = expected.get(o["customer"], 0) + o["amount"]
    print("5. per-customer totals (from the app's LevelDB state):")
    print(f"   {'customer':<9}{'total':>7}{'expected':>10}")
    for customer in sorted(expected):
        print(f"   {customer:<9}{table.get(customer, 0):>7}{expected[customer]:>10}")
    if table != expected:
        print("MISMATCH: the state is not the exactly-once totals")
        return 1
    print("every order counted exactly once, although the bus delivered some twice")
    return 0


def main() -> int:
    result: list[int] = []

    async def run() -> None:
        result.append(await demo())

    run_loop(run())
    return result[0]


if __name__ == "__main__":
    sys.exit(main())

"""``chukcha partitions CATEGORY [COUNT]``: show, or create, a category's partitions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chukcha.cli.common import add_client_options, connect, run_command
from chukcha.partitioning import MAX_PARTITIONS
from chukcha.protocol import validate_category

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``chukcha partitions`` to the subcommand parsers."""
    p = sub.add_parser(
        "partitions", help="show or create a category's partitions",
        description="Without COUNT: print the partition count of CATEGORY and the names of its "
                    "partition categories (0 when it is not partitioned). With COUNT "
                    f"(1..{MAX_PARTITIONS}): make CATEGORY a partitioned category of COUNT "
                    "partitions, recorded on the whole cluster; partition i is the ordinary "
                    "category CATEGORY.p<i on 4 digits> (e.g. orders.p0003), written by key "
                    "with `chukcha send --key FIELD`. The same COUNT again changes nothing; "
                    "another count is refused while a partition holds data.",
    )
    p.add_argument("category", help="the category (e.g. orders)")
    p.add_argument("count", nargs="?", type=int, metavar="COUNT",
                   help=f"create this many partitions (1..{MAX_PARTITIONS}); omit to show them")
    add_client_options(p)
    p.set_defaults(handler=_partitions)


def _partitions(args: argparse.Namespace) -> int:
    return run_command(lambda: _partitions_async(args))


async def _partitions_async(args: argparse.Namespace) -> int:
    validate_category(args.category)
    async with connect(args) as client:
        if args.count is None:
            count = await client.partitions(args.category)
            names = [f"{args.category}.p{i:04d}" for i in range(count)]
        else:
            names = await client.create_partitions(args.category, args.count)
            count = len(names)
    print(f"{args.category}: {count} partitions")
    for name in names:
        print(name)
    sys.stdout.flush()
    return 0

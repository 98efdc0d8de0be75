"""``chukcha groups``: list the consumer groups of categories, and remove one.

``chukcha groups [ls] [CATEGORY]`` lists groups with the number of chunks each acked and its lag
(chunks not acknowledged yet, their bytes, the age of the oldest unacknowledged message: the
node's ``/groups/lag``, see :mod:`chukcha.bus.lag`);
``chukcha groups rm NAME --category C`` unregisters a group cluster-wide (the node forwards it),
so that it no longer holds back the deletion of ``C``'s chunks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chukcha.cli.common import add_client_options, connect, format_table, run_command
from chukcha.client import Client
from chukcha.errors import ClientError, RemoteNotFoundError
from chukcha.protocol import format_go_duration, validate_category

__all__ = ["group_lags", "lag_cells", "register"]


def register(sub: Any) -> None:
    """Add ``chukcha groups`` to the subcommand parsers."""
    p = sub.add_parser(
        "groups", help="list consumer groups, or remove one",
        description="`chukcha groups [ls] [CATEGORY]` lists the consumer groups registered for "
                    "CATEGORY (or for every category), how many chunks each acked, and its lag: "
                    "chunks not acknowledged yet (UNACKED), their BYTES, and the age of the "
                    "oldest unacknowledged message (OLDEST). "
                    "`chukcha groups rm NAME --category C` unregisters group NAME of C on the "
                    "whole cluster (with its acks), so it no longer keeps C's chunks.",
    )
    p.add_argument("action", nargs="?", default="ls", metavar="ls|rm|CATEGORY",
                   help="ls (default) or rm; `chukcha groups CATEGORY` is `groups ls CATEGORY`")
    p.add_argument("name", nargs="?", metavar="CATEGORY|NAME",
                   help="ls: the category (default: all); rm: the group to remove")
    p.add_argument("--category", metavar="C", help="rm: the category the group belongs to")
    add_client_options(p)
    p.set_defaults(handler=_groups)


def _groups(args: argparse.Namespace) -> int:
    if args.action not in ("ls", "rm"):
        if args.name is not None:
            print(f"chukcha groups: error: unknown action {args.action!r}: use ls or rm",
                  file=sys.stderr)
            return 2
        args.action, args.name = "ls", args.action  # `chukcha groups CATEGORY`
    if args.action == "rm":
        return run_command(lambda: _rm(args))
    return run_command(lambda: _ls(args))


async def _ls(args: argparse.Namespace) -> int:
    category = args.name or args.category
    async with connect(args) as client:
        if category is not None:
            validate_category(category)
        lags = await group_lags(client, category)
        if category is not None:
            categories = [category]
        else:  # with the categories that have groups but no data yet
            categories = sorted({*await client.list_categories(), *(c for c, _ in lags)})
        rows: list[tuple[str, ...]] = [("CATEGORY", "GROUP", "ACKED", "UNACKED", "BYTES",
                                        "OLDEST")]
        for cat in categories:
            try:
                described = await client.list_groups(cat)
            except RemoteNotFoundError:
                raise ValueError(f"{client.nodes[0]} has no consumer groups (a Go server?)"
                                 ) from None
            rows += [(cat, str(g["name"]), str(len(g.get("acked", []))),
                      *lag_cells(lags.get((cat, str(g["name"])))))
                     for g in described.get("groups", [])]
        if len(rows) == 1:
            print("no consumer groups" + (f" for {category}" if category else ""))
        else:
            print(format_table(rows))
    return 0


async def group_lags(client: Client, category: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """``/groups/lag`` of the first node that answers; empty when none has it (a Go node)."""
    params = {"category": category} if category is not None else {}
    for url in client.nodes:
        try:
            answer = await client.api.get_json(url, "/groups/lag", params)
        except RemoteNotFoundError:
            return {}
        except ClientError:
            continue
        return {(str(x["category"]), str(x["group"])): x for x in answer or []}
    return {}


def lag_cells(lag: dict[str, Any] | None) -> tuple[str, str, str]:
    """The UNACKED, BYTES and OLDEST cells of one group's lag (``-`` when unknown)."""
    if lag is None:
        return ("-", "-", "-")
    age = lag.get("oldest_age")
    return (str(lag["chunks"]), str(lag["bytes"]),
            format_go_duration(round(age)) if age is not None else "-")


async def _rm(args: argparse.Namespace) -> int:
    if not args.name:
        raise ValueError("groups rm needs the group's NAME")
    if not args.category:
        raise ValueError("groups rm needs --category C (groups are per category)")
    category = validate_category(args.category)
    async with connect(args) as client:
        if await client.unregister_group(category, args.name):
            print(f"removed group {args.name} of {category}")
            return 0
    print(f"chukcha: error: no group {args.name!r} of {category!r}", file=sys.stderr)
    return 1

"""``chukcha app positions|reset|skip MODULE:APP``: a stopped app's read positions (the
actions of ``chukcha app`` beside ``status``, see :mod:`chukcha.cli.apps`).

- ``positions``: per input category and owner stream, where the app resumes, and how many
  bytes of the stream (as a node lists it) lie beyond;
- ``reset --category C --to earliest|end``: replay what the nodes still hold, or jump to the
  end;
- ``skip --category C [--at CHUNK:OFFSET]``: have the app step over the event it stopped on
  (the way out of a crash loop under ``on_error="stop"``), recorded in ``C.dead``.

The app must be stopped: its state directory is locked while it runs, and these refuse then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chukcha.cli.common import connect, format_table, run_command
from chukcha.cli.options import nodes_from, token_from
from chukcha.cli.run import load_app
from chukcha.protocol import validate_category

if TYPE_CHECKING:
    from chukcha.client import Client

__all__ = ["add_arguments", "run_action"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``positions``, ``reset`` and ``skip`` (``chukcha app`` has the rest)."""
    p.add_argument("--category", metavar="C", help="reset, skip: the input category")
    p.add_argument("--at", metavar="CHUNK:OFFSET",
                   help="skip: the event to step over (default: the one the app stopped on)")
    p.add_argument("--to", choices=["earliest", "end"], help="reset: where to")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="positions, reset, skip: the app's state directory (default: the "
                        "app's own)")


def run_action(args: argparse.Namespace) -> int:
    """``chukcha app positions|reset|skip MODULE:APP`` (``args.name`` is MODULE:APP)."""
    args.target = args.name
    return _app(args)


def _app(args: argparse.Namespace) -> int:
    # The processors are imported by the command that uses them, not by every `chukcha` command.
    from chukcha.processors.positions import reset_positions, skip_event  # noqa: PLC0415

    try:
        app = load_app(args.target)
    except (ValueError, TypeError) as exc:
        print(f"chukcha: error: {exc}", file=sys.stderr)
        return 2
    if args.action != "positions" and not args.category:
        print(f"chukcha: error: app {args.action} needs --category C", file=sys.stderr)
        return 2
    if args.action == "reset" and not args.to:
        print("chukcha: error: app reset needs --to earliest or --to end", file=sys.stderr)
        return 2
    state_dir = args.state_dir or app.state_dir
    nodes = nodes_from(args, default=None) or list(app.nodes)
    token = token_from(args) or app.config.token

    async def main() -> int:
        async with connect(args, nodes, token) as client:
            if args.action == "positions":
                return await _show(client, state_dir, list(app.handlers))
            category = validate_category(args.category)
            if args.action == "reset":
                new = await reset_positions(state_dir, client, category, args.to)
                for owner, (chunk, offset) in sorted(new.items()):
                    print(f"{category} {owner}: now at {chunk}:{offset}")
                if not new:
                    print(f"{category}: no data on the node; the app reads it from the start")
                return 0
            skipped = await skip_event(state_dir, category, _at(args.at))
            what = f"event {skipped.event_id} " if skipped.event_id else "the event "
            print(f"the app will skip {what}at {category} {skipped.chunk}:{skipped.offset} "
                  f"when it next runs, and record it in {category}.dead"
                  + (f" (it failed with {skipped.error})" if skipped.error else ""))
            return 0

    return run_command(main)


def _at(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    chunk, sep, offset = text.rpartition(":")
    if not sep or not offset.isdigit():
        raise ValueError(f"--at {text!r}: expected CHUNK:OFFSET (as the app's error names it)")
    return chunk, int(offset)


async def _show(client: Client, state_dir: Path, categories: list[str]) -> int:
    from chukcha.processors.positions import read_positions  # noqa: PLC0415 - see _app

    positions = await read_positions(state_dir)
    rows: list[tuple[str, ...]] = [("CATEGORY", "OWNER", "CHUNK", "OFFSET", "BEHIND BYTES")]
    for category in sorted({*categories, *positions}):
        listed = await client.list_chunks(category)
        owners = sorted({c.name.rpartition("-")[0] for c in listed} | set(positions.get(
            category, {})))
        for owner in owners:
            stream = [c for c in listed if c.name.rpartition("-")[0] == owner]
            pos = positions.get(category, {}).get(owner)
            if pos is None:
                behind = sum(c.size for c in stream)
                rows.append((category, owner, "(start)", "0", str(behind)))
                continue
            chunk, offset = pos
            behind = sum(c.size for c in stream if c.name > chunk) + sum(
                max(0, c.size - offset) for c in stream if c.name == chunk)
            rows.append((category, owner, chunk, str(offset), str(behind)))
    print(format_table(rows))
    return 0

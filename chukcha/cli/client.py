"""The client tools: ``chukcha send``, ``chukcha tail``, ``chukcha ls``, ``chukcha status``.

Every command takes ``--node URL`` (repeatable; default ``$CHUKCHA_NODES``, comma-separated, or
``http://127.0.0.1:8080``). Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Final, cast

import orjson

from chukcha.cli.common import add_client_options, connect, format_table, one_line, run_command
from chukcha.cli.options import duration, size
from chukcha.client import Client, Consumer, Producer
from chukcha.client.keyed import KeyedProducer
from chukcha.errors import ClientError, RemoteNotFoundError
from chukcha.partitioning import partition_category
from chukcha.protocol import format_go_duration, validate_category

__all__ = ["register"]

_PROGRESS_MIN_BYTES: Final = 8 << 20
_READ_BLOCK: Final = 1 << 20


def register(sub: Any) -> None:
    """Add ``send``, ``tail``, ``ls`` and ``status`` to the subcommand parsers."""
    p = sub.add_parser("send", help="send lines of a file (or stdin) as events",
                       description="Send each non-empty line of FILE (or stdin) as one event, "
                                   "with failover between nodes. Lines are sent as they are, "
                                   "so a line without an \"id\" sent twice is two events to "
                                   "processors; --id-field or --auto-id give JSON lines IDs "
                                   "that make a re-sent file count once.")
    p.add_argument("category", help="the category to write to (created by the first write)")
    p.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                   help="input file, '-' for stdin (default)")
    p.add_argument("--sync", action="store_true", help="ask the node to fsync before answering")
    p.add_argument("--min-sync-replicas", type=int, default=0, metavar="K",
                   help="answer only when K other nodes hold the data")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--key", metavar="FIELD",
                   help="lines are JSON objects; write each into the partition of its field "
                        "FIELD (a string or an integer) of the partitioned CATEGORY (see "
                        "`chukcha partitions`)")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--id-field", metavar="F",
                     help="lines are JSON objects; each one's field F becomes its \"id\" (the "
                          "event ID processors deduplicate by), so a re-sent file counts once")
    ids.add_argument("--auto-id", action="store_true",
                     help="lines are JSON objects; one without an \"id\" gets a deterministic "
                          "one (a hash of its line number and content), so sending the same "
                          "file again is deduplicated by processors")
    add_client_options(p)
    p.set_defaults(handler=_send)

    p = sub.add_parser("tail", help="print the events of a category",
                       description="Print every event of CATEGORY, one per line. Without "
                                   "--follow it prints what is there and exits (exit code 1 "
                                   "when the category does not exist; for a partitioned one "
                                   "it names the partitions to tail). With --group G it "
                                   "skips what group G has acked; with --commit (or --follow) "
                                   "it also registers G and acks, for G, the chunks it "
                                   "printed. Without either it changes nothing on the nodes.")
    p.add_argument("category", help="the category to print")
    p.add_argument("--group", metavar="G", help="read as consumer group G: skip the chunks G "
                                                "acked")
    p.add_argument("--commit", action="store_true",
                   help="with --group: register G (if new) and ack the printed chunks for it; "
                        "remove G later with `chukcha groups rm G --category C`")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep waiting for new events (with --group: implies --commit)")
    add_client_options(p)
    p.set_defaults(handler=_tail)

    p = sub.add_parser("ls", help="list categories, or the chunks of one",
                       description="Without CATEGORY: the categories with their chunk counts "
                                   "and sizes. With it: each chunk, its size, whether it is "
                                   "complete, and which consumer groups have acked it.")
    p.add_argument("category", nargs="?",
                   help="the category whose chunks to list (default: list the categories)")
    add_client_options(p)
    p.set_defaults(handler=_ls)

    p = sub.add_parser("retention", help="show or set a category's retention",
                       description="Show, or set on every --node, how long a category keeps "
                                   "complete chunks (acked or not): by age and by total bytes. "
                                   "0 turns a limit off.")
    p.add_argument("category", help="the category whose retention to show or set")
    p.add_argument("--max-age", type=duration, metavar="DURATION",
                   help="delete complete chunks older than this (90m, 24h, 7d, 2w; 0 = off)")
    p.add_argument("--max-bytes", type=size, metavar="SIZE",
                   help="delete the oldest complete chunks while the category holds more "
                        "(bytes, or 500MB, 10GiB...; 0 = off)")
    add_client_options(p)
    p.set_defaults(handler=_retention)

    p = sub.add_parser("status", help="show a node's peers and replication lag",
                       description="Show each --node's /status: its peers, whether they are "
                                   "up, and the replication lag in bytes.")
    add_client_options(p)
    p.set_defaults(handler=_status)


# --- plumbing -------------------------------------------------------------------------------


async def _write_out(stream: IO[bytes], data: bytes) -> None:
    # Writing to a pipe can block when the reader is slow: keep it off the event loop.
    await asyncio.to_thread(_write_flush, stream, data)


def _write_flush(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)
    stream.flush()


# --- send -----------------------------------------------------------------------------------


def _send(args: argparse.Namespace) -> int:
    return run_command(lambda: _send_async(args))


async def _send_async(args: argparse.Namespace) -> int:
    if args.file == "-":
        stream = cast(io.BufferedReader, sys.stdin.buffer)
        total = None
    else:
        stream = await asyncio.to_thread(open, args.file, "rb")
        total = (await asyncio.to_thread(os.fstat, stream.fileno())).st_size
    show = (not args.no_progress and sys.stderr.isatty()
            and (total is None or total >= _PROGRESS_MIN_BYTES))
    bar = _progress(total) if show else None
    count = 0
    started = time.monotonic()
    try:
        async with connect(args) as client, _producer(client, args) as producer:
            # read1 returns what is there (from a pipe: without waiting for a full block), so
            # `tail -f log | chukcha send c` sends each line within the producer's linger.
            rest = b""
            lineno = 0
            stamp = _id_stamper(args)
            while block := await asyncio.to_thread(stream.read1, _READ_BLOCK):
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                events = []
                for ln in lines:
                    lineno += 1
                    if ln.strip():
                        try:
                            events.append(stamp(ln, lineno) if stamp else ln)
                        except ValueError:
                            await producer.send_many(events)  # the lines before it go
                            raise
                await producer.send_many(events)
                count += len(events)
                if bar is not None:
                    bar.update(len(block))
            if rest.strip():
                await producer.send(stamp(rest, lineno + 1) if stamp else rest)
                count += 1
    finally:
        if bar is not None:
            bar.close()
        if stream is not sys.stdin.buffer:
            await asyncio.to_thread(stream.close)
    elapsed = time.monotonic() - started
    print(f"sent {count} events to {args.category} in {elapsed:.2f} s", file=sys.stderr)
    return 0


def _producer(client: Client, args: argparse.Namespace) -> Producer | KeyedProducer:
    if args.key is None:
        return client.producer(args.category, sync=args.sync,
                               min_sync_replicas=args.min_sync_replicas, max_batch_bytes=4 << 20)
    field: str = args.key

    def key(event: Any) -> str | int:
        value = event.get(field) if isinstance(event, dict) else None
        if type(value) is not str and type(value) is not int:
            raise ValueError(f"an event has no string or integer field {field!r} to route it "
                             f"by (--key {field}): {orjson.dumps(event)[:200].decode()}")
        return value

    return client.producer(args.category, key=key, sync=args.sync,
                           min_sync_replicas=args.min_sync_replicas, max_batch_bytes=4 << 20)


def _id_stamper(args: argparse.Namespace) -> Callable[[bytes, int], bytes] | None:
    """What ``--id-field F`` or ``--auto-id`` do to one line (``None``: lines go as they are).

    Raises ValueError (naming the line) for a line that is not a JSON object or lacks F."""
    field: str | None = args.id_field
    if field is None and not args.auto_id:
        return None

    def stamp(line: bytes, lineno: int) -> bytes:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            raise ValueError(  # noqa: TRY004 - bad input, reported as one line
                f"line {lineno} is not a JSON object ({_flag_name(args)} needs "
                "one per line); the lines before it were sent")
        if field is not None:
            value = event.get(field)
            if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                raise ValueError(f"line {lineno} has no string or integer field {field!r}; "
                                 "the lines before it were sent")
            if "id" in event and event["id"] != value:
                raise ValueError(f"line {lineno} has an \"id\" other than its {field!r}; "
                                 "the lines before it were sent")
            if "id" in event:
                return line
            return orjson.dumps({"id": value, **event})
        if "id" in event:
            return line
        digest = hashlib.blake2b(b"%d\0%s" % (lineno, line.rstrip(b"\r")), digest_size=14)
        return orjson.dumps({"id": digest.hexdigest(), **event})

    return stamp


def _flag_name(args: argparse.Namespace) -> str:
    return "--auto-id" if args.auto_id else "--id-field"


def _progress(total: int | None) -> Any:
    from tqdm import tqdm  # noqa: PLC0415 - only on a terminal

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="send",
                file=sys.stderr)


# --- tail -----------------------------------------------------------------------------------


def _tail(args: argparse.Namespace) -> int:
    return run_command(lambda: _tail_async(args))


async def _tail_async(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    validate_category(args.category)
    if args.commit and not args.group:
        raise ValueError("--commit needs --group G (the group to ack for)")
    commit = bool(args.group) and (args.commit or args.follow)
    async with connect(args) as client:
        if not args.follow and args.category not in await client.list_categories():
            count = 0
            with contextlib.suppress(RemoteNotFoundError):  # a Go node: no partitions
                count = await client.partitions(args.category)
            if count:
                raise ValueError(
                    f"{args.category} is partitioned: tail one of its {count} partitions, "
                    f"{partition_category(args.category, 0)} to "
                    f"{partition_category(args.category, count - 1)}")
            raise ValueError(f"no category {args.category!r} on {client.nodes[0]} "
                             "(chukcha ls lists them)")
        consumer = client.consumer(args.category, group=args.group, register=commit)
        async with consumer:
            while True:
                batches = await consumer.read(timeout=None if args.follow else 0.2)
                if batches:
                    await _write_out(out, b"".join(b.data for b in batches))
                    if commit:
                        await consumer.commit({b.owner: b.position for b in batches})
                elif not args.follow and consumer.caught_up:
                    break
            if commit:
                await _final_commit(consumer)
    return 0


async def _final_commit(consumer: Consumer) -> None:
    # One more commit of where we are: the last batches' chunks may have been found complete
    # only after they were printed.
    await consumer.commit(consumer.positions())


# --- ls -------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    return run_command(lambda: _ls_async(args))


async def _ls_async(args: argparse.Namespace) -> int:
    async with connect(args) as client:
        if args.category is None:
            rows: list[tuple[str, ...]] = [("CATEGORY", "CHUNKS", "BYTES")]
            for cat in await client.list_categories():
                chunks = await client.list_chunks(cat)
                rows.append((cat, str(len(chunks)), str(sum(c.size for c in chunks))))
        else:
            chunks = await client.list_chunks(args.category)
            acked_by: dict[str, list[str]] = {}
            groups: list[str] = []
            with contextlib.suppress(RemoteNotFoundError):  # a Go node: no groups
                described = await client.list_groups(args.category)
                for g in described.get("groups", []):
                    groups.append(g["name"])
                    for chunk in g.get("acked", []):
                        acked_by.setdefault(chunk, []).append(g["name"])
            rows = [("CHUNK", "BYTES", "COMPLETE", "ACKED BY")]
            rows += [(c.name, str(c.size), "yes" if c.complete else "no",
                      ",".join(acked_by.get(c.name, [])) or "-") for c in chunks]
            if groups:
                print(f"groups: {', '.join(groups)}")
        print(format_table(rows))
    return 0


# --- retention ------------------------------------------------------------------------------


def _retention(args: argparse.Namespace) -> int:
    return run_command(lambda: _retention_async(args))


async def _retention_async(args: argparse.Namespace) -> int:
    validate_category(args.category)
    params = {"category": args.category}
    if args.max_age is not None:
        params["max_age"] = f"{args.max_age:g}"
    if args.max_bytes is not None:
        params["max_bytes"] = str(args.max_bytes)
    async with connect(args) as client:
        for url in client.nodes:
            policy = await client.api.get_json(url, "/retention", params)
            age, max_bytes = policy.get("max_age"), policy.get("max_bytes")
            print(f"{url}: {args.category}: max age "
                  f"{format_go_duration(age) if age else 'off'}, max bytes {max_bytes or 'off'}")
    return 0


# --- status ---------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    return run_command(lambda: _status_async(args))


async def _status_async(args: argparse.Namespace) -> int:
    code = 0
    async with connect(args) as client:
        for url in client.nodes:
            code = max(code, await _one_status(client, url))
    return code


async def _one_status(client: Client, url: str) -> int:
    try:
        st = await client.status(url)
    except RemoteNotFoundError:
        print(f"{url}: no /status (a standalone node without the cluster extension, or a Go "
              "node); it answers, so it is up")
        return 0
    except ClientError as exc:
        print(f"chukcha: error: {url}: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"{url}: instance {st.get('instance', '?')} at {st.get('address', '?')}")
    peers = st.get("peers") or []
    if not peers:
        print("  no peers")
        return 0
    rows = [("PEER", "URL", "UP", "LAG BYTES", "LAST SEEN")]
    now = time.time()
    for p in peers:
        seen = p.get("last_seen")
        rows.append((str(p.get("instance", "?")), str(p.get("url", "?")),
                     "yes" if p.get("up") else "no", str(p.get("lag_bytes", "?")),
                     f"{now - float(seen):.1f} s ago" if seen is not None else "never"))
    print("\n".join("  " + line for line in format_table(rows).splitlines()))
    return 0

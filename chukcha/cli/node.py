"""``chukcha node``: run a node with the Go server's flags (and ours beside them)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Final

from chukcha.bus.config import NodeConfig, ReplicationConfig, default_instance_name, parse_peers
from chukcha.bus.server import ServerLimits
from chukcha.cli.options import duration, whole_seconds
from chukcha.cli.options import positive_duration as _duration
from chukcha.cli.options import positive_size as _size
from chukcha.errors import ChukchaError
from chukcha.loop import run_loop, stop_signals
from chukcha.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CHUNK_SIZE,
    format_go_duration,
    validate_category,
    validate_instance,
)

__all__ = ["config_from_args", "register", "run_async", "setup_logging"]

logger = logging.getLogger(__name__)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except empty ones and those the help text states itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, "", False) or "(default" in text:
            return text
        return super()._get_help_string(action) or text


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"invalid listen address {text!r}: expected HOST:PORT")
    return (host.strip("[]") or "0.0.0.0", int(port))  # noqa: S104 - ":8080" means all, as in Go


def _retain(text: str) -> tuple[str | None, float | None]:
    category, sep, period = text.rpartition("=")
    if sep and not category:
        raise argparse.ArgumentTypeError(f"invalid {text!r}: expected [CATEGORY=]DURATION")
    if sep:
        try:
            validate_category(category)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return (category if sep else None), (duration(period) or None)


def _instance(text: str) -> str:
    try:
        return validate_instance(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(parser: Any, name: str, **kwargs: Any) -> None:  # a parser or an argument group
    # The Go server's flag package takes -name and --name alike; so do we.
    parser.add_argument(f"--{name}", f"-{name}", **kwargs)


def register(sub: Any) -> None:
    """Add ``chukcha node`` to the subcommand parsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "node",
        help="run a bus node",
        description=(
            "Run a Chukcha node. With no flags it is a standalone node on 127.0.0.1:8080 keeping "
            "data in ./chukcha-data. The Go server's flags work unchanged (-flag or --flag)."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    _flag(p, "instance", type=_instance, default=default_instance_name(), metavar="NAME",
          help="this node's name; its chunk files start with it (default: the host name)")
    _flag(p, "dirname", type=Path, default="chukcha-data",
          help="the data directory")
    _flag(p, "listen", type=_listen, default="127.0.0.1:8080", metavar="HOST:PORT",
          help="address to serve HTTP on")
    _flag(p, "peers", default="", metavar="NAME=HOST:PORT,...",
          help="static list of the other nodes (this node's own entry is ignored)")
    _flag(p, "max-chunk-size", type=_size, default=DEFAULT_MAX_CHUNK_SIZE, metavar="SIZE",
          help="start a new chunk when a write would take the current one past this "
               "(bytes, or with a unit: KB MB GB KiB MiB GiB)")
    _flag(p, "rotate-chunk-interval", type=_duration, default="10m", metavar="DURATION",
          help="close a non-empty chunk this often (Go syntax: 50ms, 10s, 10m, 1h30m; "
               "also 1d, 1w)")
    ext = p.add_argument_group("extensions (not in the Go server)")
    _flag(ext, "max-batch-size", type=_size, default=DEFAULT_MAX_BATCH_SIZE, metavar="SIZE",
          help="largest accepted write body")
    _flag(ext, "sync-each-write", action="store_true",
          help="fsync every write before answering (else per request with sync=1)")
    _flag(ext, "workers", type=_workers, default=os.cpu_count() or 1, metavar="N",
          help="serve from N processes: one writer (the node) and N-1 front workers, each "
               "on its own listening socket (SO_REUSEPORT; with N > 2 only the fronts accept "
               "clients), that coalesce concurrent small writes into writes of the writer "
               "and hand it every other connection; a worker that dies is restarted (default: "
               "the number of cores; on a 2-core box shared with its clients --workers 1 is "
               "faster for single writes)")
    _flag(ext, "no-group-commit", action="store_true",
          help="fsync each durable write (sync=1, --sync-each-write) on its own instead of "
               "letting concurrent ones share one fsync (for comparison benchmarks)")
    _flag(ext, "etcd", default=os.environ.get("CHUKCHA_ETCD", ""), metavar="URL[,URL...]",
          help="etcd endpoints for membership (env CHUKCHA_ETCD); none: static --peers")
    _flag(ext, "cluster", default="default", metavar="NAME",
          help="cluster name: the etcd key prefix chukcha/<cluster>/")
    _flag(ext, "dead-peer-timeout", type=_duration, default="1h", metavar="DURATION",
          help="after a peer has been gone this long its last chunk counts as complete")
    _flag(ext, "etcd-lease-ttl", type=whole_seconds, default=10, metavar="DURATION",
          help="etcd lease TTL: how long a killed node stays registered (whole seconds: "
               "10, 30s, 2m)")
    _flag(ext, "replication-poll-wait", type=_duration, default="10s", metavar="DURATION",
          help="how long a replica's long poll on a peer's open chunk lasts when idle")
    _flag(ext, "retain-acked", type=_retain, action="append", default=[],
          metavar="[CATEGORY=]DURATION",
          help="keep chunks every consumer acknowledged this long (for replay) before deleting "
               "them; CATEGORY=DURATION for one category (0: delete at once); repeatable "
               "(default: delete at once, as the Go server)")
    _flag(ext, "auth-token-file", type=Path, default=None, metavar="PATH",
          help="require 'Authorization: Bearer TOKEN' for every request that changes data; "
               "the file lists the accepted tokens, one per line (# comments), re-read when it "
               "changes (rotate: add the new token, move clients over, remove the old); the "
               "first is sent to peers")
    _flag(ext, "auth-reads", action="store_true",
          help="require the token for reads too (needs --auth-token-file)")
    _flag(ext, "tls-cert", type=Path, default=None, metavar="PATH",
          help="serve HTTPS with this certificate (PEM); with --tls-key")
    _flag(ext, "tls-key", type=Path, default=None, metavar="PATH",
          help="the private key of --tls-cert (PEM)")
    _flag(ext, "tls-ca", type=Path, default=None, metavar="PATH",
          help="CA certificate(s) to trust for https:// peers (default: the system's store); "
               "give peers as NAME=https://HOST:PORT")
    _flag(ext, "no-metrics", action="store_true",
          help="do not serve /metrics nor time requests (for comparison benchmarks)")
    lim = p.add_argument_group(
        "connection limits (extensions; what slow or idle clients may hold)")
    d = ServerLimits()
    _flag(lim, "max-connections", type=int, default=d.max_connections, metavar="N",
          help="open connections at most; at the cap the longest-idle keep-alive connection "
               "is closed for a newcomer, with none idle the newcomer gets a 503")
    _flag(lim, "header-timeout", type=_duration, default=f"{d.header_timeout:g}s",
          metavar="DURATION", help="time from a request's first byte to the end of its headers")
    _flag(lim, "body-timeout", type=_duration, default=f"{d.body_timeout:g}s",
          metavar="DURATION", help="longest pause inside a request body")
    _flag(lim, "keepalive-timeout", type=_duration, default=f"{d.keepalive_timeout:g}s",
          metavar="DURATION", help="an idle keep-alive connection is closed after this")
    _flag(lim, "send-timeout", type=_duration, default=f"{d.send_timeout:g}s",
          metavar="DURATION", help="a client that takes no byte of its answer this long is "
                                   "disconnected")
    _flag(lim, "memory-budget", type=_size, default=d.memory_budget, metavar="SIZE",
          help="memory held at once for bodies being received and answers waiting for slow "
               "clients; when it is spent, the clients stalled longest are disconnected")
    _flag(ext, "listen-fd", type=int, default=None, metavar="FD",
          help="serve on this already bound listening socket (socket activation)")
    _flag(ext, "log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
          help="logging level")
    p.set_defaults(handler=_run)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Build the :class:`NodeConfig` from parsed ``chukcha node`` arguments."""
    return NodeConfig(
        instance=args.instance,
        data_dir=args.dirname,
        listen=args.listen,
        listen_fd=args.listen_fd,
        peers=parse_peers(args.peers),
        max_chunk_size=args.max_chunk_size,
        rotate_interval=args.rotate_chunk_interval,
        max_batch_size=args.max_batch_size,
        max_message_size=min(args.max_batch_size, 1 << 20),
        sync_each_write=args.sync_each_write,
        group_commit=not args.no_group_commit,
        etcd_endpoints=tuple(e.strip() for e in args.etcd.split(",") if e.strip()),
        cluster=args.cluster,
        metrics=not args.no_metrics,
        auth_token_file=args.auth_token_file,
        auth_reads=args.auth_reads,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        server=ServerLimits(
            max_connections=args.max_connections, header_timeout=args.header_timeout,
            body_timeout=args.body_timeout, keepalive_timeout=args.keepalive_timeout,
            send_timeout=args.send_timeout, memory_budget=max(args.memory_budget,
                                                              args.max_batch_size),
        ),
        retain_acked=next((p for c, p in reversed(args.retain_acked) if c is None), None),
        retain_acked_categories=tuple((c, p) for c, p in args.retain_acked if c is not None),
        replication=ReplicationConfig(
            dead_peer_timeout=args.dead_peer_timeout,
            lease_ttl=args.etcd_lease_ttl,
            poll_wait=args.replication_poll_wait,
        ),
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def run_async(config: NodeConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    from chukcha.bus.node import Node  # noqa: PLC0415 - keep `chukcha --help` light

    node = Node(config)
    await node.start()
    _freeze_start_up_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("instance=%s stopping (signal)", config.instance)
    finally:
        await node.stop()


def _freeze_start_up_objects() -> None:
    """The objects made while starting (modules, classes, the node's structures: ~100k) stay
    for the life of the process: moved out of the cyclic garbage collector's generations
    (``gc.freeze``), so that no later full collection walks them again. Measured on a node
    serving single writes (``bench_bus.py --mode single``, 40,000 writes at 64 connections,
    ``gc.callbacks``): a full collection in a fresh node took ~28 ms of CPU and the collector
    ~70 ms in all, ~7 % of the node's CPU for the run. Garbage cycles of the start are freed
    first (young generations only: a full collection here would add its ~30 ms to every
    start)."""
    gc.collect(1)
    gc.freeze()


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes: {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be between 1 and 1024")
    return value


def _return_big_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after a big buffer is freed, so later 1-16 MiB read
    answers and write bodies come from the heap, which is not given back: a burst of slow
    readers would leave the node hundreds of MiB bigger for good. A fixed 1 MiB threshold keeps
    every big buffer in its own mapping, returned when freed. libc is reached through the
    running process's own symbols: ``ctypes.util.find_library("c")`` runs ``ldconfig`` in a
    subprocess, 40 ms of every node start (and of every worker's, for ``prctl``)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _one_blas_thread() -> None:
    """numpy (which counts the messages of big bodies, :func:`chukcha.protocol.count_newlines`)
    starts a BLAS thread per core that spins for work on import; the node needs none. Set
    before numpy is imported, in the node's own process (and inherited by its workers)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


_GIL_SWITCH: Final = 0.0005


def _quick_gil_hand_off() -> None:
    """Big reads and writes (``pread`` of a 1 MiB answer, the chunk ``write`` of a big body)
    run in worker threads; a worker done with its system call waits for the GIL while the loop
    computes, by default up to 5 ms, and the request waits with it. 0.5 ms makes a bulk
    request's latency the work, not the wait (a thread that nobody waits for is not
    interrupted, so single-message requests pay nothing). Three side-by-side sessions
    (``bench_vs_go --only bulk --runs 5 -n 2000000 --baseline``, load 6-8): 1 MiB reads 486 vs
    388, 546 vs 481, 493 vs 319 MB/s (Go 493, 542, 404); writes 479 vs 437, 357 vs 554, 437 vs
    435 MB/s (no change beyond the noise). Inherited by forked workers."""
    sys.setswitchinterval(_GIL_SWITCH)


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    _return_big_buffers_to_the_os()
    _one_blas_thread()
    _quick_gil_hand_off()
    try:
        config = config_from_args(args)
        if config.auth_token_file is not None:
            from chukcha.bus.auth import read_tokens  # noqa: PLC0415 - keep --help light

            read_tokens(config.auth_token_file)  # a clear line now, not a failed start later
    except (ValueError, OSError) as exc:
        logger.error("invalid configuration: %s", exc)  # noqa: TRY400 - one clear line
        return 2
    logger.info(
        "starting instance=%s dirname=%s listen=%s:%d rotate=%s",
        config.instance, config.data_dir, *config.listen,
        format_go_duration(config.rotate_interval),
    )
    if args.workers > 1:
        from chukcha.cli.workers import run_workers  # noqa: PLC0415 - keep --help light

        try:
            return run_workers(config, args.workers)
        except OSError as exc:
            logger.error("cannot start: %s", exc)  # noqa: TRY400
            return 1
    try:
        run_loop(run_async(config))
    except ChukchaError as exc:
        logger.error("%s", exc)  # noqa: TRY400 - a clear line, not a traceback
        return 1
    except OSError as exc:
        logger.error("cannot start: %s", exc)  # noqa: TRY400
        return 1
    return 0

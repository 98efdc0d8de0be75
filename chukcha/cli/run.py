"""``chukcha run module:app``: run a processor app until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chukcha.cli.node import setup_logging
from chukcha.cli.options import (
    add_credential_options,
    nodes_from,
    tls_ca_path,
    token_from,
    whole_seconds,
)
from chukcha.errors import ChukchaError

# The processors (LevelDB, the engine, the app's monitor) are imported when `chukcha run` runs,
# not when any `chukcha` command builds its parser: a node process does not load them.
if TYPE_CHECKING:
    from chukcha.processors.base import App
    from chukcha.processors.group import GroupConfig
    from chukcha.processors.split import StaticSplit

__all__ = ["load_app", "register"]

logger = logging.getLogger(__name__)


def load_app(target: str) -> App:
    """Import ``module:attribute`` (attribute defaults to ``app``) and return the :class:`App`.

    The current directory is importable, as with ``python -m``.

    Raises:
        ValueError: the target cannot be imported.
        TypeError: it is not an App.
    """
    from chukcha.processors.base import App  # noqa: PLC0415 - see the imports

    module_name, _, attr = target.partition(":")
    if not module_name:
        raise ValueError(f"invalid app {target!r}: expected module:app")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = getattr(module, attr or "app", None)
    if not isinstance(obj, App):
        raise TypeError(f"{module_name}:{attr or 'app'} is not a chukcha App (got {obj!r})")
    return obj


def register(sub: Any) -> None:
    """Add ``chukcha run`` to the subcommand parsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run a processor app (module:app)",
        description=(
            "Run a processor app until SIGINT or SIGTERM, then stop gracefully (finish the "
            "batch, commit, ack). Exit codes: 0 stopped, 1 failed (a callback under the stop "
            "policy, a locked state directory, another live instance of the app), 2 bad "
            "arguments. Without --etcd, an instance announces itself in the category "
            "<app>.instances every 3 s and refuses to start (or stops) while another instance "
            "of the app with overlapping partitions has announced itself in the last 15 s."
        ),
        allow_abbrev=False,
    )
    p.add_argument("target", metavar="MODULE:APP", help="e.g. examples.orders:app")
    p.add_argument("--node", "-node", action="append", metavar="URL",
                   help="a node to read from and write to (repeatable; default "
                        "$CHUKCHA_NODES, comma-separated, else the app's own nodes)")
    p.add_argument("--nodes", default="", metavar="URL[,URL...]",
                   help="deprecated: use --node (repeatable)")
    add_credential_options(p)
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="the LevelDB state directory (default: the app's own)")
    p.add_argument("--instances", type=int, default=None, metavar="N",
                   help="run as one of N instances with a static split of the partitions "
                        "(without etcd): this one processes the partitions p with "
                        "p %% N == --instance-index; each keeps its own --state-dir")
    p.add_argument("--instance-index", type=int, default=None, metavar="I",
                   help="this instance's index, 0..N-1 (with --instances)")
    p.add_argument("--etcd", action="append", default=None, metavar="URL",
                   help="join the app's instances through etcd (repeatable): partitions are "
                        "shared among the running instances and move when one joins, leaves "
                        "or dies; needs changelog=True (an input not partitioned with the "
                        "app's count is repartitioned by the owner of partition 0)")
    p.add_argument("--cluster", default="default", metavar="NAME",
                   help="with --etcd: the cluster name, as the nodes' (default 'default')")
    p.add_argument("--instance", default=None, metavar="NAME",
                   help="with --etcd: this instance's name, stable across restarts (default: "
                        "the host name and a hash of --state-dir)")
    p.add_argument("--lease-ttl", type=whole_seconds, default=10, metavar="DURATION",
                   help="with --etcd: how long a killed instance keeps its partitions "
                        "(whole seconds: 10, 30s, 2m; default 10s)")
    p.add_argument("--standbys", type=int, default=None, metavar="N",
                   help="with --etcd: how many other instances keep a warm copy of each "
                        "partition by following its changelog, so that a failover applies "
                        "only the newest records instead of restoring the state (default: the "
                        "app's ProcessorConfig.standbys, 0)")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve the app's Prometheus /metrics and its web monitor /ui on this "
                        "address (read-only, no authentication: keep it on loopback or a "
                        "private network)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level (default: INFO; progress lines are INFO, undecodable "
                        "events WARNING)")
    p.set_defaults(handler=_run)


def _split_from(args: argparse.Namespace, app: App) -> StaticSplit | None:
    if (args.instances is None) != (args.instance_index is None):
        raise ValueError("--instances and --instance-index go together")
    if args.instances is None:
        return None
    from chukcha.processors.split import StaticSplit  # noqa: PLC0415 - see the imports

    split = StaticSplit(args.instance_index, args.instances)
    split.owned(app.partitions)  # refuses more instances than partitions
    return split


def _group_from(args: argparse.Namespace, split: StaticSplit | None) -> GroupConfig | None:
    if not args.etcd:
        if args.standbys:
            raise ValueError("--standbys needs --etcd (standbys are instances of a group)")
        return None
    if split is not None:
        raise ValueError("--etcd and --instances exclude each other")
    if args.standbys is not None and args.standbys < 0:
        raise ValueError("--standbys must be >= 0")
    from chukcha.processors.group import GroupConfig  # noqa: PLC0415 - see the imports

    return GroupConfig(tuple(args.etcd), args.cluster, args.instance, args.lease_ttl,
                       args.standbys)


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        app = load_app(args.target)
        if args.nodes:
            logger.warning("--nodes is deprecated: use --node URL (repeatable)")
            args.node = [*(args.node or []), args.nodes]
        nodes = nodes_from(args, default=None)
        if nodes:
            app.nodes = tuple(nodes)
        if args.state_dir is not None:
            app.state_dir = args.state_dir
        token = token_from(args)
        tls_ca = tls_ca_path(args)
        if token is not None or tls_ca is not None:
            app.config = replace(app.config, token=token or app.config.token,
                                 tls_ca=Path(tls_ca) if tls_ca else app.config.tls_ca)
        split = _split_from(args, app)
        group = _group_from(args, split)
        if args.http is not None:
            from chukcha.processors.monitor import parse_http_address  # noqa: PLC0415

            parse_http_address(args.http)
    except (ValueError, TypeError) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - one clear line, not a traceback
        return 2
    try:
        app.run(split=split, http=args.http, group=group)
    except ChukchaError as exc:
        logger.error("app=%s failed: %s", app.name, exc)  # noqa: TRY400
        return 1
    return 0

"""``chukcha app status NAME``: the instances of an app, who owns which partition (with its
epoch), and how far the app's consumer groups are behind.

With ``--etcd URL --cluster C`` the instances and claims come from etcd
(:mod:`chukcha.bus.app_coordination`); the lag of the app's groups (``NAME``, and the groups
``NAME.<I>of<N>`` of a static split, :mod:`chukcha.processors.split`) comes from the first node
that answers (``/groups/lag``). ``--json`` prints one JSON object instead of tables.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

import orjson

from chukcha.bus.app_coordination import read_app
from chukcha.cli import app_positions
from chukcha.cli.common import add_client_options, connect, format_table, run_command
from chukcha.cli.groups import group_lags, lag_cells
from chukcha.protocol import validate_category

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``chukcha app`` to the subcommand parsers."""
    p = sub.add_parser(
        "app", help="show an app's instances, partitions and lag",
        description="`chukcha app status NAME` shows the instances of app NAME and the "
                    "partitions each owns with their epochs and standbys, and the partitions "
                    "that fail to start and why (from etcd, with --etcd and --cluster), and "
                    "the lag of the app's consumer groups (NAME, and "
                    "NAME.<I>of<N> for a static split) from the first node that answers: "
                    "chunks not acknowledged yet, their bytes, the oldest message's age. "
                    "For a stopped app (its state is locked while it runs): `chukcha app "
                    "positions MODULE:APP` shows where it resumes in each stream and how far "
                    "behind that is; `reset MODULE:APP --category C --to earliest|end` replays "
                    "what the nodes still hold (see chukcha node --retain-acked) or skips to "
                    "the end; `skip MODULE:APP --category C [--at CHUNK:OFFSET]` makes it step "
                    "over the event it stopped on (a poison event under on_error=stop) at its "
                    "next run, recording it in C.dead.",
    )
    p.add_argument("action", choices=["status", "positions", "reset", "skip"],
                   help="status; or, for a stopped app, positions, reset, skip")
    p.add_argument("name", metavar="NAME|MODULE:APP",
                   help="status: the app's name (its consumer group); positions, reset, "
                        "skip: the app, e.g. examples.orders:app")
    p.add_argument("--etcd", default=None, metavar="URL",
                   help="an etcd endpoint of the cluster (for instances and partition claims)")
    p.add_argument("--cluster", default="default", metavar="NAME",
                   help="the cluster name (etcd key prefix chukcha/<cluster>/; default "
                        "'default')")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_options(p)
    app_positions.add_arguments(p)
    p.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.action != "status":
        return app_positions.run_action(args)
    return run_command(lambda: _status(args))


async def _status(args: argparse.Namespace) -> int:
    name = validate_category(args.name)
    result: dict[str, Any] = {"app": name}
    if args.etcd:
        view = await read_app((args.etcd,), args.cluster, name)
        result["partitions"] = view.partitions
        result["instances"] = {
            m: {"pid": info.get("pid"),
                "partitions": sorted(p for p, c in view.claims.items() if c.owner == m),
                "standby_of": sorted(p for p, ms in view.standbys.items() if m in ms)}
            for m, info in sorted(view.members.items())
        }
        result["claims"] = {str(p): {"owner": c.owner, "epoch": c.epoch,
                                     "standbys": sorted(view.standbys.get(p, ())),
                                     "standbys_ready": sorted(view.ready.get(p, ()))}
                            for p, c in sorted(view.claims.items())}
        result["failing"] = {str(p): [{"instance": m, **info} for m, info in sorted(f.items())]
                             for p, f in sorted(view.failing.items()) if f}
    own_groups = re.compile(rf"{re.escape(name)}(\.\d+of\d+)?")
    async with connect(args) as client:
        lags = await group_lags(client, None)
    result["lag"] = [lag for (_, group), lag in sorted(lags.items())
                     if own_groups.fullmatch(group)]
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    _print(result, args)
    return 0


def _failing(f: dict[str, Any]) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(f["since"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        since = "?"
    return (f"{f.get('failures')} failure(s) in a row since {since}: {f.get('error')} "
            "(retried with a backoff; that instance's log says more)")


def _print(result: dict[str, Any], args: argparse.Namespace) -> None:
    name = result["app"]
    if "instances" in result:
        if not result["instances"] and not result["claims"]:
            print(f"app {name}: no instances in etcd (cluster {args.cluster})")
        else:
            print(f"app {name}: {result['partitions']} partitions, "
                  f"{len(result['instances'])} instance(s) (cluster {args.cluster})")
            print(format_table([("INSTANCE", "PID", "PARTITIONS", "STANDBY OF"), *(
                (m, str(i["pid"]), ",".join(map(str, i["partitions"])) or "-",
                 ",".join(map(str, i["standby_of"])) or "-")
                for m, i in result["instances"].items())]))
            print(format_table([("PARTITION", "OWNER", "EPOCH", "STANDBYS"), *(
                (p, c["owner"], str(c["epoch"]), ",".join(
                    m if m in c["standbys_ready"] else f"{m} (catching up)"
                    for m in c["standbys"]) or "-")
                for p, c in result["claims"].items())]))
            unowned = (result["partitions"] or 0) - len(result["claims"])
            if unowned > 0:
                print(f"{unowned} partition(s) have no owner now")
            for p, failures in result["failing"].items():
                for f in failures:
                    print(f"partition {p} cannot start on {f['instance']}: {_failing(f)}")
    if result["lag"]:
        print(format_table([("CATEGORY", "GROUP", "UNACKED", "BYTES", "OLDEST"), *(
            (lag["category"], lag["group"], *lag_cells(lag)) for lag in result["lag"])]))
    else:
        print(f"no consumer group of app {name} on the node")

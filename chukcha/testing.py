"""Helpers that start real servers on loopback, for tests, examples and benchmarks.

- :func:`run_node`: a node in this process, bound to ``127.0.0.1:0`` by the node itself.
- :class:`NodeProcess`, :func:`spawn_node`, :func:`bind_loopback`: nodes as subprocesses
  (:mod:`chukcha.testing_node`), clusters and etcd (:mod:`chukcha.testing_cluster`), ClickHouse
  (:mod:`chukcha.testing_clickhouse`): re-exported here, the one place users import them from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from chukcha.bus.config import NodeConfig
from chukcha.bus.node import Node
from chukcha.testing_clickhouse import ClickHouseServer, run_clickhouse
from chukcha.testing_cluster import (
    ClusterProcess,
    EtcdServer,
    etcd_binary,
    run_cluster,
    run_etcd,
)
from chukcha.testing_node import NodeProcess, bind_loopback, spawn_node, wait_http_ready

__all__ = [
    "ClickHouseServer",
    "ClusterProcess",
    "EtcdServer",
    "NodeProcess",
    "bind_loopback",
    "etcd_binary",
    "run_clickhouse",
    "run_cluster",
    "run_etcd",
    "run_node",
    "spawn_node",
    "wait_http_ready",
]


@contextlib.asynccontextmanager
async def run_node(
    data_dir: Path, instance: str = "test", **overrides: Any
) -> AsyncIterator[Node]:
    """Run a node in this process on ``127.0.0.1:<free port>`` until the block ends."""
    config = NodeConfig(instance=instance, data_dir=data_dir, listen=("127.0.0.1", 0))
    if overrides:
        config = dataclasses.replace(config, **overrides)
    async with Node(config) as node:
        yield node

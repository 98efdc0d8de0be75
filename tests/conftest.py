"""Shared fixtures: a real node on loopback, an HTTP session, blocking-I/O detection."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from blockbuster import BlockBuster, blockbuster_ctx
from hypothesis import settings

from chukcha.bus.node import Node
from chukcha.testing import run_node

# No per-example deadline: the suite runs on a shared 2-core machine where an example that
# takes 50 ms on a quiet one can take 300 ms, and speed is measured in bench/, not in tests
# (tests/state/test_changelog.py failed on hypothesis's 200 ms default at load 10).
settings.register_profile("chukcha", deadline=None)
settings.load_profile("chukcha")

# The test modules whose node processes run twice: on one process and on 4 (one writer, three
# fronts; ``chukcha.testing.NodeProcess`` passes ``--workers $CHUKCHA_TEST_WORKERS``), so every
# guarantee they prove is proven whichever worker a request lands on: the cluster, failure,
# Go-client and Go-peer tests (in-process nodes are one process either way, so the rest would
# only repeat). With CHUKCHA_TEST_WORKERS set, every test runs once, on that many.
WORKERS_MODULES = frozenset({
    "tests/bus/test_restart.py",
    "tests/integration/test_replication.py",
    "tests/integration/test_failures.py",
    "tests/integration/test_go_reader.py",
    "tests/integration/test_go_interop.py",
    "tests/integration/test_groups_cluster.py",
})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    path = metafunc.definition.path.relative_to(metafunc.config.rootpath).as_posix()
    if path in WORKERS_MODULES and "CHUKCHA_TEST_WORKERS" not in os.environ:
        metafunc.parametrize("node_workers", [1, 4], indirect=True,
                             ids=["workers1", "workers4"])


@pytest.fixture(autouse=True)
def node_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many processes each node process of the test runs on (``--workers``): the parameter
    of a module in :data:`WORKERS_MODULES`, else $CHUKCHA_TEST_WORKERS, else 1. Autouse, so it
    is set before any fixture starts a node."""
    workers = getattr(request, "param", None)
    if workers is None:
        return int(os.environ.get("CHUKCHA_TEST_WORKERS", "1"))
    monkeypatch.setenv("CHUKCHA_TEST_WORKERS", str(workers))
    return int(workers)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long scenarios (``slow``) first, the rest in file order: with pytest-xdist handing out
    tests one at a time (``--maxschedchunk 1`` in the Makefile), the longest ones start at once
    and the short ones fill the gaps, instead of one minute-long test starting last and the
    other processes idling while it runs. A stable sort: the same order on every worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail a test that does blocking disk or socket I/O on the event loop (as aiohttp does).

    Tests marked ``allow_blocking`` (subprocess orchestration, LevelDB in sync code) opt out.
    """
    if request.node.get_closest_marker("allow_blocking"):
        yield None
        return
    with blockbuster_ctx() as bb:
        # Small page-cache appends run on the loop by design (chukcha.bus.chunks._append_small).
        bb.functions["os.write"].can_block_in("chukcha/bus/chunks.py", "_append_small")
        # ... and so is a small replicated chunk's creation (ChunkStore._store_replica).
        bb.functions["os.write"].can_block_in("chukcha/bus/chunks.py", "_create_file")
        # Hypothesis scans the test modules' source once per process, at its first draw, which
        # can happen inside a running loop: test tooling, not our code.
        for func in bb.functions.values():
            func.can_block_in("hypothesis/internal/conjecture/providers.py",
                              "_get_local_constants")
        yield bb


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "data", instance="moscow") as n:
        yield n


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session

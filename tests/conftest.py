"""Shared fixtures: a real node on loopback, an HTTP session, blocking-I/O detection."""

from __future__ import annotations

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

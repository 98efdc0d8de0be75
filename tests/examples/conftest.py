"""Fixtures for the sink examples: a real ClickHouse server, the Elasticsearch stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha.testing_clickhouse import ClickHouseServer, run_clickhouse
from examples.es_standin import ElasticsearchStandin


@pytest.fixture
async def clickhouse(tmp_path: Path) -> AsyncIterator[ClickHouseServer]:
    """A ClickHouse server of its own (config and data under ``tmp_path``), killed afterwards."""
    root = tmp_path / "clickhouse"
    async with run_clickhouse(root) as server:
        yield server


@pytest.fixture
async def es() -> AsyncIterator[ElasticsearchStandin]:
    """The in-process Elasticsearch stand-in, on its own loopback port."""
    async with ElasticsearchStandin() as server:
        yield server

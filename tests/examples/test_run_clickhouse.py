"""The ClickHouse fixture itself: readiness, a taken port, teardown."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import aiohttp
import pytest

from chukcha import testing_clickhouse
from chukcha.testing_clickhouse import ClickHouseError, run_clickhouse


async def test_a_taken_port_is_retried_and_the_server_is_killed_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    real_free_port = testing_clickhouse._free_port
    handed_out: list[int] = []

    def first_a_taken_port() -> int:
        port = real_free_port() if handed_out else taken.getsockname()[1]
        handed_out.append(port)
        return port

    monkeypatch.setattr(testing_clickhouse, "_free_port", first_a_taken_port)
    try:
        async with run_clickhouse(tmp_path / "ch") as ch:
            assert len(handed_out) == 2  # the taken port failed, the second one worked
            assert ch.url == f"http://127.0.0.1:{handed_out[1]}"
            assert (await ch.query("SELECT 1 + 1")).strip() == "2"
            with pytest.raises(ClickHouseError) as info:
                await ch.query("SELECT nonsense(")
            assert info.value.status >= 400
            pid = ch.pid
    finally:
        taken.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{ch.url}/ping")

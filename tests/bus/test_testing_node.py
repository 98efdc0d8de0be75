""":class:`chukcha.testing.NodeProcess` under uvloop, the loop the benchmarks run it on."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import uvloop

from chukcha.testing import NodeProcess


@pytest.mark.parametrize("own_group", [False, True])
def test_a_node_process_starts_and_stops_on_uvloop(tmp_path: Path, own_group: bool) -> None:
    # uvloop's subprocess_exec refuses keyword arguments it does not know, even None: the
    # benchmarks (bench_vs_go, bench_bus) could not start a node while NodeProcess passed
    # process_group=None.
    async def main() -> int:
        node = NodeProcess(tmp_path / "data", "u", own_group=own_group)
        await node.start()
        try:
            async with aiohttp.ClientSession() as http, \
                    http.post(f"{node.url}/write", params={"category": "c"}, data=b"m\n") as r:
                assert r.status == 200
        finally:
            code = await node.stop()
            node.close()
        return code

    assert uvloop.run(main()) == 0

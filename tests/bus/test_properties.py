"""Property: any split of any message sequence across writes reads back byte-identical from a
real node, every read is cut only at ``\\n``, also with small ``max_size`` and across chunks."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chukcha.bus.node import Node
from chukcha.testing import run_node
from tests.bus.conftest import Api

_categories = itertools.count()


@pytest.fixture
async def small_chunks(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "data", instance="moscow", max_chunk_size=64) as node:
        yield node


messages_st = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=25
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=messages_st, data=st.data(), max_size=st.integers(min_value=1, max_value=120))
async def test_any_split_reads_back_identical_and_cut_at_newlines(
    small_chunks: Node, http: aiohttp.ClientSession, messages: list[bytes],
    data: st.DataObject, max_size: int,
) -> None:
    api = Api(http, small_chunks.url)
    category = f"p{next(_categories)}"  # one node for all examples, a fresh category each
    cuts = sorted(data.draw(st.sets(st.integers(1, len(messages) - 1), max_size=10))
                  if len(messages) > 1 else set())
    bounds = [0, *cuts, len(messages)]
    for a, b in itertools.pairwise(bounds):
        await api.write(category, b"".join(m + b"\n" for m in messages[a:b]))
    expected = b"".join(m + b"\n" for m in messages)

    got = bytearray()
    for info in await api.list_chunks(category):  # name order = write order for one owner
        off = 0
        while True:
            ans = await api.call("/read", {"category": category, "chunk": info["name"],
                                           "off": off, "max_size": max_size})
            if ans.status == 500:
                # Only when the next message does not fit; a bigger buffer gets past it.
                assert "smaller than the message" in ans.text
                rest = expected[len(got):]
                assert rest.index(b"\n") + 1 > max_size
                ans = await api.call("/read", {"category": category, "chunk": info["name"],
                                               "off": off, "max_size": rest.index(b"\n") + 1})
            assert ans.status == 200, ans
            if not ans.body:
                break
            assert ans.body.endswith(b"\n")
            assert len(ans.body) <= max(max_size, ans.body.index(b"\n") + 1)
            got += ans.body
            off += len(ans.body)
        assert off == info["size"]
    assert bytes(got) == expected

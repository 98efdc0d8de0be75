"""Helpers for the cluster scenarios: raw HTTP against real nodes, bounded waits on their state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp

__all__ = [
    "chunks_of",
    "list_chunks",
    "read_all",
    "wait_for",
    "write",
]


async def write(
    http: aiohttp.ClientSession, url: str, category: str, body: bytes, **params: str
) -> aiohttp.ClientResponse:
    """POST ``/write``; returns the (read) response."""
    async with http.post(f"{url}/write", params={"category": category, **params},
                         data=body) as resp:
        await resp.read()
        return resp


async def list_chunks(http: aiohttp.ClientSession, url: str, category: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/listChunks", params={"category": category}) as resp:
        assert resp.status == 200, await resp.text()
        return list(await resp.json() or [])


def chunks_of(listing: Iterable[dict[str, Any]]) -> dict[str, int]:
    return {c["name"]: c["size"] for c in listing}


async def read_all(http: aiohttp.ClientSession, url: str, category: str) -> list[bytes]:
    """Every message of ``category`` on one node, in listing order (chunk by chunk)."""
    messages: list[bytes] = []
    for info in await list_chunks(http, url, category):
        off = 0
        while True:
            async with http.get(f"{url}/read", params={
                "category": category, "chunk": info["name"], "off": str(off),
                "max_size": str(4 << 20),
            }) as resp:
                assert resp.status == 200, await resp.text()
                data = await resp.read()
            if not data:
                break
            off += len(data)
            messages.extend(data[:-1].split(b"\n"))
    return messages


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll a real server's state until ``check()`` holds (bounded by ``timeout``).

    Used where the servers offer no push for the condition (e.g. "node B has every chunk").
    """
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)  # bounded poll of a real server's state
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

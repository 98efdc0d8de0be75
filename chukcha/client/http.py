"""The low-level node API: one method per endpoint, one mapping of statuses to errors.

:class:`NodeApi` knows nothing about failover or batching; it sends one request to one node and
turns every failure into a :class:`~chukcha.errors.ClientError`: an HTTP error status through
:func:`~chukcha.errors.error_from_status` (the client's one mapping point), a connection failure
or a timeout into a retriable ``ClientError`` with ``status == 0``.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any, Final

import aiohttp
import orjson

from chukcha.errors import ClientError, error_from_status
from chukcha.protocol import ChunkInfo

__all__ = ["DEFAULT_TIMEOUT", "NodeApi", "normalize_url"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds one request (not counting a long poll's ``wait``) may take."""


def normalize_url(url: str) -> str:
    """``127.0.0.1:8080`` -> ``http://127.0.0.1:8080``; no trailing slash."""
    url = url.strip()
    if not url:
        raise ValueError("empty node URL")
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


class NodeApi:
    """Requests to nodes over one shared :class:`aiohttp.ClientSession`; with ``token`` each
    carries ``Authorization: Bearer <token>`` (a node with ``--auth-token-file``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._session = session
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else None

    @property
    def timeout(self) -> float:
        return self._timeout

    async def _request(
        self,
        url: str,
        path: str,
        params: dict[str, str],
        body: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes:
        full = f"{url}{path}"
        payload = _payload(body) if body is not None else None
        try:
            async with asyncio.timeout(timeout or self._timeout):
                async with self._session.post(full, params=params, data=payload,
                                              headers=self._headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise error_from_status(
                            resp.status, data.decode(errors="replace"), url=full
                        )
                    return data
        except ClientError:
            raise
        except TimeoutError:
            raise ClientError(f"{full}: no answer within {timeout or self._timeout:g} s",
                              url=full) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ClientError(f"{full}: {type(exc).__name__}: {exc}", url=full) from exc

    async def write(
        self,
        url: str,
        category: str,
        body: bytes,
        *,
        sync: bool = False,
        min_sync_replicas: int = 0,
    ) -> None:
        """``/write``: append whole ``\\n``-terminated messages."""
        params = {"category": category}
        if sync:
            params["sync"] = "1"
        if min_sync_replicas:
            params["min_sync_replicas"] = str(min_sync_replicas)
        # A min_sync_replicas write may legitimately wait up to a minute on the node.
        timeout = max(self._timeout, 65.0) if min_sync_replicas else None
        await self._request(url, "/write", params, body, timeout=timeout)

    async def read(
        self,
        url: str,
        category: str,
        chunk: str,
        offset: int,
        max_size: int,
        *,
        wait: float = 0.0,
    ) -> bytes:
        """``/read``: whole messages from ``offset``; ``b""`` means no more data (for now).

        With ``wait`` > 0 the node (ours; the Go server ignores it) holds the request until data
        arrives, the chunk becomes complete, or ``wait`` seconds pass.
        """
        params = {"category": category, "chunk": chunk, "off": str(offset),
                  "max_size": str(max_size)}
        if wait > 0:
            params["wait"] = f"{wait:g}"
        return await self._request(url, "/read", params, timeout=self._timeout + wait)

    async def ack(
        self, url: str, category: str, chunk: str, size: int, *, group: str | None = None,
        fence: tuple[int, int] | None = None, app: str | None = None,
    ) -> None:
        """``/ack`` (for ``group`` when given: the consumer-group extension). ``fence`` =
        ``(partition, epoch)``: the node applies the ack only while that claim holds (a stale
        one raises a :class:`~chukcha.errors.RequestRejectedError` with status 409); the claim
        is of the app ``group``, or of ``app`` for a plain ack (a partition's changelog)."""
        params = {"category": category, "chunk": chunk, "size": str(size)}
        if group:
            params["group"] = group
        if fence is not None:
            params["partition"], params["epoch"] = str(fence[0]), str(fence[1])
            if app:
                params["app"] = app
        await self._request(url, "/ack", params)

    async def list_chunks(self, url: str, category: str) -> list[ChunkInfo]:
        """``/listChunks``, sorted by name (the Go server's ``null`` becomes ``[]``)."""
        data = await self._request(url, "/listChunks", {"category": category})
        items = _json(data, url) or []
        return sorted((ChunkInfo.from_json(i) for i in items), key=lambda c: c.name)

    async def list_categories(self, url: str) -> list[str]:
        data = await self._request(url, "/listCategories", {})
        return [str(c) for c in (_json(data, url) or [])]

    async def copy_group_ack(
        self, url: str, category: str, chunk: str, size: int, group: str, *, timeout: float
    ) -> None:
        """``/groups/ack`` (extension): record on ``url`` a group ack made on another node."""
        params = {"category": category, "chunk": chunk, "size": str(size), "group": group}
        await self._request(url, "/groups/ack", params, timeout=timeout)

    async def register_group(
        self, url: str, category: str, group: str, *, timeout: float | None = None
    ) -> None:
        """``/groups/register`` (extension)."""
        await self._request(url, "/groups/register", {"category": category, "group": group},
                            timeout=timeout)

    async def unregister_group(self, url: str, category: str, group: str) -> bool:
        """``/groups/unregister`` (extension): whether the group was registered (the node
        forwards the removal to the cluster)."""
        data = await self._request(url, "/groups/unregister",
                                   {"category": category, "group": group})
        answer = _json(data, url)
        return isinstance(answer, dict) and bool(answer.get("removed"))

    async def list_groups(self, url: str, category: str) -> dict[str, Any]:
        """``/groups/list`` (extension): ``{"category", "groups": [{"name", "acked"}]}``."""
        data = await self._request(url, "/groups/list", {"category": category})
        result = _json(data, url)
        if not isinstance(result, dict):
            raise ClientError(f"{url}/groups/list: unexpected answer {result!r}", url=url)
        return result

    async def status(self, url: str) -> dict[str, Any]:
        """``/status`` (extension, clustered nodes)."""
        result = _json(await self._request(url, "/status", {}), url)
        if not isinstance(result, dict):
            raise ClientError(f"{url}/status: unexpected answer {result!r}", url=url)
        return result

    async def get_json(self, url: str, path: str, params: dict[str, str]) -> Any:
        """Any other JSON endpoint."""
        return _json(await self._request(url, path, params), url)


def _payload(body: bytes) -> aiohttp.BytesPayload:
    # aiohttp warns about bodies over 1 MiB given as bytes ("might lock the event loop"): a
    # write body of a few MiB goes to the socket in one non-blocking call, so it does not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(body)


def _json(data: bytes, url: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"{url}: invalid JSON answer: {exc}", url=url) from None

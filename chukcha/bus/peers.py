"""How this node reaches its peers: the one place that sets up node-to-node HTTP.

Every component that talks to other nodes (replication's events streams, reads and progress
reports; the groups' forwarding) takes its HTTP session from :meth:`PeerAccess.session`, and
the raw chunk fetcher its extra header lines from :meth:`PeerAccess.header_lines`, so the
bearer token of ``--auth-token-file`` (the file's first token, re-read when it changes) and the
TLS trust of ``--tls-ca`` apply to all of them alike.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

__all__ = ["PeerAccess"]


class PeerAccess:
    """The token and TLS settings of requests to peers.

    Args:
        token: returns the token to present now (``None``: no token configured).
        ssl_context: trust for ``https://`` peers (``None``: the system's default store).
    """

    def __init__(
        self,
        token: Callable[[], str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._token = token
        self.ssl_context = ssl_context

    def headers(self) -> dict[str, str]:
        """The headers every request to a peer carries now."""
        if self._token is None:
            return {}
        return {"Authorization": f"Bearer {self._token()}"}

    def header_lines(self) -> str:
        """:meth:`headers` as raw HTTP/1.1 header lines (``"Name: value\\r\\n"`` each)."""
        return "".join(f"{k}: {v}\r\n" for k, v in self.headers().items())

    def session(self, **connector: Any) -> aiohttp.ClientSession:
        """A session for peer requests; ``connector`` goes to the
        :class:`aiohttp.TCPConnector` (``limit=0``...). The caller closes it."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context or True, **connector),
            middlewares=(self._authorize,) if self._token is not None else (),
            auto_decompress=False,
            read_bufsize=1 << 20,
        )

    async def _authorize(
        self, request: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:
        # Per request, not as the session's default headers: a rotated token applies at once.
        for name, value in self.headers().items():
            request.headers[name] = value
        return await handler(request)

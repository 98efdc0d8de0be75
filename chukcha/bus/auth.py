"""Who may talk to a node: bearer tokens and the cross-site check (one per-request check).

- **Tokens** (``chukcha node --auth-token-file PATH``): the file holds one token per line (blank
  lines and ``#`` comments ignored); every listed token is accepted, so a token is rotated by
  adding the new one, moving clients and peers over, then removing the old one. The file is
  re-read when it changes (checked every second), without a restart. The node presents the
  *first* token to its peers. With tokens, every request that changes anything needs
  ``Authorization: Bearer <token>``; with ``--auth-reads`` every other request does too.
  Refused: ``401`` with ``WWW-Authenticate: Bearer``.
- **Cross-site requests** (always, tokens or not): a browser visiting another site can make
  requests to a node it can reach (a form POST, or a plain ``<img src=".../ack?...">``). A
  request that changes anything is refused (``403``) when it carries an ``Origin`` that is not
  the node's own address, or a ``Sec-Fetch-Site`` other than ``same-origin``/``none``. Clients
  that are not browsers (the Go client, curl, our client) send neither header: nothing changes
  for them.

What counts as a read is listed in :data:`READ_PATHS` (and ``/retention`` and ``/partitions``
without new values);
every other path, including ones added later and unknown ones, counts as a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from chukcha.bus import web

__all__ = ["READ_PATHS", "NodeAuth", "TokenFile", "read_tokens"]

logger = logging.getLogger(__name__)

READ_PATHS: Final = frozenset({
    "/read", "/listChunks", "/listCategories", "/status", "/groups/list", "/groups/lag",
    "/metrics", "/replication/events", "/replication/tombstones", "/ui",
})
"""Endpoints that change nothing (``/ui/...`` too)."""
_SAFE_FETCH_SITES: Final = frozenset({"same-origin", "none"})


def read_tokens(path: Path) -> tuple[str, ...]:
    """The tokens in a token file (blocking).

    Raises:
        ValueError: the file holds no token, or a token with spaces or control characters.
        OSError: it cannot be read.
    """
    tokens: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() or not c.isprintable() for c in line):
            raise ValueError(f"{path}: a token must not contain spaces or control characters")
        tokens.append(line)
    if not tokens:
        raise ValueError(f"{path} holds no token (one per line; # starts a comment)")
    return tuple(tokens)


class TokenFile:
    """The accepted tokens, re-read when the file changes (:meth:`watch_forever`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens: tuple[bytes, ...] = ()
        self._first = ""
        self._stamp: tuple[int, int, int] | None = None

    def load(self) -> None:
        """Read the file now (blocking; at start, where a bad file must stop the node)."""
        stamp = _stamp(self.path)
        tokens = read_tokens(self.path)
        self._tokens = tuple(t.encode() for t in tokens)
        self._first = tokens[0]
        self._stamp = stamp

    @property
    def current(self) -> str:
        """The token this node presents to its peers (the file's first)."""
        return self._first

    def accepts(self, token: str) -> bool:
        given = token.encode()
        ok = False
        for t in self._tokens:  # no early exit: the time taken says nothing about the tokens
            ok |= hmac.compare_digest(t, given)
        return ok

    async def watch_forever(self, interval: float = 1.0) -> None:
        """Re-read the file whenever it changes; a bad new version keeps the old tokens."""
        while True:
            await asyncio.sleep(interval)
            try:
                stamp = await asyncio.to_thread(_stamp, self.path)
                if stamp == self._stamp:
                    continue
                await asyncio.to_thread(self.load)
            except (OSError, ValueError) as exc:
                logger.warning("auth token file %s: %s; keeping the %d token(s) loaded before",
                               self.path, exc, len(self._tokens))
                with contextlib.suppress(OSError):
                    self._stamp = await asyncio.to_thread(_stamp, self.path)
                continue
            logger.info("auth token file %s re-read: %d token(s)", self.path, len(self._tokens))


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


_CROSS_SITE_HEADERS: Final = frozenset(("origin", "sec-fetch-site"))


class NodeAuth:
    """The node's access check (see the module docstring)."""

    def __init__(self, tokens: TokenFile | None, *, auth_reads: bool = False) -> None:
        if auth_reads and tokens is None:
            raise ValueError("auth_reads needs a token file")
        self.tokens = tokens
        self._auth_reads = auth_reads
        # Without tokens, only a request that could be cross-site is checked (see check).
        self.only_with = _CROSS_SITE_HEADERS if tokens is None else None

    def check(self, request: web.Request) -> web.StreamResponse | None:
        """The server's per-request check (synchronous): ``None`` lets the request through."""
        tokens = self.tokens
        if tokens is None:
            headers = request.headers  # lower-case names: plain dict look-ups (every request)
            if dict.get(headers, "origin") is None and dict.get(headers, "sec-fetch-site") is None:
                return None  # no token asked for, and nothing that could be cross-site
        changes = _changes(request)
        if changes and _cross_site(request):
            logger.info("refused a cross-site %s %s (Origin %s)", request.method, request.path,
                        request.headers.get("Origin", "-"))
            return web.Response(status=403, text="cross-site request refused: this endpoint "
                                                 "changes data\n")
        if tokens is not None and (changes or self._auth_reads):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not tokens.accepts(token.strip()):
                return web.Response(
                    status=401, text="unauthorized: send Authorization: Bearer <token>\n",
                    headers={"WWW-Authenticate": 'Bearer realm="chukcha"'},
                )
        return None


def _changes(request: web.Request) -> bool:
    path = request.path
    if path == "/write":  # the hot path first
        return True
    if path in READ_PATHS or path.startswith("/ui/"):
        return False
    if path == "/retention":
        return "max_age" in request.query or "max_bytes" in request.query
    if path == "/partitions":
        return "count" in request.query
    return True


def _cross_site(request: web.Request) -> bool:
    headers = request.headers  # lower-case names: plain dict look-ups (every request)
    site = dict.get(headers, "sec-fetch-site")
    if site is not None and site not in _SAFE_FETCH_SITES:
        return True
    origin = dict.get(headers, "origin")
    if origin is None:
        return False
    if origin == "null":  # sandboxed frames, file:// pages, privacy redirects
        return True
    return urlsplit(origin).netloc.lower() != request.host.lower()

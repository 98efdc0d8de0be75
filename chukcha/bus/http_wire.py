"""The bytes of an HTTP answer's head (status line, ``Date``, headers), for
:mod:`chukcha.bus.connection`: pure functions, no I/O. The ``Date`` header is formatted once a
second, and so is the whole head of the most common answer (an empty HTTP/1.1 200: a write).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Final

__all__ = ["empty_ok_head", "response_head"]

_time: Final = time.time
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}


class _DateCache:
    """The ``Date`` header, formatted once a second, and the whole head of the most common
    answer (an empty HTTP/1.1 200: a write) with it."""

    second = 0
    value = b""
    empty_ok = b""


def _date() -> bytes:
    now = int(_time())
    if _DateCache.second != now:
        _refresh(now)
    return _DateCache.value


def _refresh(now: int) -> None:
    _DateCache.second = now
    _DateCache.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    _DateCache.empty_ok = b"HTTP/1.1 200 OK\r\nDate: %b\r\nContent-Length: 0\r\n\r\n" % (
        _DateCache.value)


def empty_ok_head() -> bytes:
    """The head of an empty HTTP/1.1 200 kept alive (what :func:`response_head` makes)."""
    now = int(_time())  # _date(), written out: this is every small write's answer
    if _DateCache.second != now:
        _refresh(now)
    return _DateCache.empty_ok


def response_head(
    status: int, content_type: bytes, length: int | None, *, close: bool,
    version: str = "1.1", headers: Mapping[str, str] | None = None, keep_alive: bool = True,
) -> bytes:
    # HTTP/1.1 answers everything but 1.0 (a 0.9 request line gets a 1.1 answer too).
    proto = b"HTTP/1.0" if version == "1.0" else b"HTTP/1.1"
    parts = [b"%b %d %b\r\n" % (proto, status, _REASONS.get(status, b"")),
             b"Date: %b\r\n" % _date()]
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    if content_type:
        parts.append(b"Content-Type: %b\r\n" % content_type)
    for name, value in (headers or {}).items():
        parts.append(b"%b: %b\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if close:
        parts.append(b"Connection: close\r\n")
    elif version == "1.0" and keep_alive:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)

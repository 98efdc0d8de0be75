"""A recogniser for the commonest request shape, for :mod:`chukcha.bus.connection`: one whole
plain HTTP/1.1 request in one buffer (a client's single write), taken apart with two regular
expressions instead of llhttp's seven callbacks into Python.

It only ever *declines* what it is not sure of (``None``: the connection feeds the bytes to
llhttp as before): anything but exactly one complete ``GET`` or ``POST`` request with an
origin-form target and no fragment, ``HTTP/1.1``, header lines of a token name, optional
blanks and a value of visible ASCII (blanks inside, none at its end), no header that changes
how the message is framed or kept (``Transfer-Encoding``, ``Connection`` but for
``keep-alive``, ``Proxy-Connection``, ``Upgrade``, ``Expect``), at most one
``Content-Length`` (digits, and exactly the bytes that follow the head), no body without it,
and no bytes after it. What it accepts, llhttp parses to the same method, target, headers and
body, kept alive (``tests/bus/test_http_simple.py`` checks that with Hypothesis against
``httptools`` itself).
What a head parses to, or that it was declined, is kept: a client sends the same head again
and again.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from chukcha.bus.web import Headers

__all__ = ["HEADER_NAMES", "simple_request"]

_HEAD: Final = re.compile(
    rb"(GET|POST) (/[!-\"$-~]*) HTTP/1\.1\r\n"  # origin form, visible ASCII, no '#'
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*[!-~]+(?:[ \t]+[!-~]+)*\r\n)*)\r\n"
)
_HEADER: Final = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([!-~]+(?:[ \t]+[!-~]+)*)\r\n")

HEADER_NAMES: Final = {
    spelled.encode(): spelled.lower()
    for name in ("Host", "Content-Length", "Content-Type", "User-Agent", "Accept-Encoding",
                 "Accept", "Connection", "Authorization", "Expect", "Transfer-Encoding",
                 "Origin")
    for spelled in (name, name.lower())
}
"""The lower-case names of the headers clients send most, by their bytes as sent (a look-up
instead of decoding and lowering each): here and in :mod:`chukcha.bus.connection`'s parser
callbacks."""
_DECLINED: Final = frozenset(("transfer-encoding", "connection", "proxy-connection", "upgrade",
                              "expect"))
"""Headers that change how llhttp frames or keeps the message, or how it is answered."""
_METHODS: Final = {b"GET": "GET", b"POST": "POST"}


def simple_request(data: bytes, max_head: int, max_body: int,
                   ) -> tuple[str, str, str, Headers, bytes] | None:
    """``data`` as one whole simple request (see the module's doc): its method, path
    (``%``-decoded), query string, headers (lower-case names, the last of repeated ones: the
    dict kept for this head, to be copied before anyone may change it) and body; ``None``
    when ``data`` is anything else, or its head is over ``max_head`` bytes (its length, or the
    connection's count of it: the parser's path answers 431 above it), or its body over
    ``max_body``.

    A client sends the same head again and again (a single write's differs only by its
    ``Content-Length``): what a head parses to is kept (:data:`_HEADS`), so a head seen
    before costs a dict look-up."""
    end = data.find(b"\r\n\r\n", 0, max_head) + 4
    if end < 4:
        return None
    head = data[:end]
    known = _HEADS.get(head)
    if known is None:
        known = _parse_head(head)
        if end <= _KEPT_HEAD_SIZE:  # (at most ~1 MiB kept in all)
            if len(_HEADS) >= _KEPT_HEADS:
                _HEADS.clear()  # many clients or changing heads: start over
            _HEADS[head] = known
    if known is _NOT_SIMPLE:
        return None  # (a head declined before: declined again for the price of a look-up)
    method, path, query, headers, length, counted = known
    if len(data) - end != length or length > max_body or counted > max_head:
        return None
    return method, path, query, headers, data[end:] if length else b""


_Head = tuple[str, str, str, Headers, int, int]
_NOT_SIMPLE: Final[_Head] = ("", "", "", Headers(), -1, 0)
_KEPT_HEADS: Final = 1024
_KEPT_HEAD_SIZE: Final = 1024
_HEADS: dict[bytes, _Head] = {}
"""Heads parsed (:func:`simple_request`): method, path, query string, headers, body length,
the bytes the connection's header limit counts of it (the target, and each header's name and
value plus 4, as llhttp's callbacks hand them over: a head of many short headers counts more
than its length); or :data:`_NOT_SIMPLE`."""


def _parse_head(head: bytes) -> _Head:
    match = _HEAD.fullmatch(head)
    if match is None:
        return _NOT_SIMPLE
    headers = Headers()
    length = -1
    counted = len(match.group(2))
    for name, value in _HEADER.findall(head, match.start(3), match.end(3)):
        counted += len(name) + len(value) + 4
        key = HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if key in _DECLINED or key == "content-length":  # (an odd spelling of it)
                return _NOT_SIMPLE
        elif key == "content-length":
            if length >= 0 or not value.isdigit():
                return _NOT_SIMPLE  # llhttp refuses a second one
            length = int(value)
        elif key == "connection":
            if value.lower() != b"keep-alive":
                return _NOT_SIMPLE  # close, upgrade...: 1.1 is kept alive without it
        elif key in _DECLINED:  # Expect, Transfer-Encoding
            return _NOT_SIMPLE
        headers[key] = value.decode("latin-1")
    path_b, _, query_b = match.group(2).partition(b"?")
    path = path_b.decode("latin-1")
    if "%" in path:
        path = unquote(path)
    return (_METHODS[match.group(1)], path, query_b.decode("latin-1"), headers, max(length, 0),
            counted)

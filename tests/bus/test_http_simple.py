"""The recogniser of whole simple requests (:mod:`chukcha.bus.http_simple`) that lets a
connection skip llhttp's callbacks: whatever it accepts, llhttp (``httptools``) parses to the
same request, and a node answers the same bytes the same whichever of the two took them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha.bus import connection, http_simple, web
from chukcha.bus.auth import NodeAuth, TokenFile
from chukcha.bus.http_simple import simple_request
from chukcha.bus.node import Node
from chukcha.bus.routing import Router
from chukcha.bus.server import HttpServer, ServerLimits
from chukcha.bus.web import Headers, Request, Response
from chukcha.testing import bind_loopback, run_node

_MAX_HEAD = 8192
_MAX_BODY = 1 << 20


@dataclass
class _Parsed:
    begun: int = 0
    completed: int = 0
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.completed += 1


def _llhttp(data: bytes) -> tuple[str, str, str, dict[str, str], bytes] | str:
    """What the connection makes of ``data`` through llhttp when it is one whole request
    kept alive, else why not."""
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        return f"error {exc!r}"
    if (parsed.begun, parsed.completed) != (1, 1):
        return f"{parsed.begun} begun, {parsed.completed} complete"
    if not parser.should_keep_alive() or parser.get_http_version() != "1.1":
        return "not kept alive or not 1.1"
    path_b, _, query_b = parsed.url.partition(b"?")
    path = path_b.decode("latin-1")
    if "%" in path:
        path = unquote(path)
    headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in parsed.headers}
    return (parser.get_method().decode(), path, query_b.decode("latin-1"), headers,
            parsed.body)


def _check(data: bytes, max_head: int = _MAX_HEAD, max_body: int = _MAX_BODY) -> bool:
    """``simple_request`` declines ``data`` or agrees with llhttp; True: it accepted."""
    got = simple_request(data, max_head, max_body)
    if got is None:
        return False
    method, path, query, headers, body = got
    assert type(headers) is Headers  # (the one kept for this head)
    assert _llhttp(data) == (method, path, query, dict(headers), body), data
    head = data.index(b"\r\n\r\n") + 4
    assert head <= max_head and len(body) <= max_body, data
    assert b"#" not in data[:data.index(b"\r\n")], data  # a fragment: parse_url's
    return True


_NAMES = st.sampled_from([
    b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"CONTENT-LENGTH",
    b"Content-Type", b"User-Agent", b"Accept", b"Accept-Encoding", b"Authorization", b"Origin",
    b"X-Thing", b"Transfer-Encoding", b"transfer-encoding", b"Connection", b"connection",
    b"Proxy-Connection", b"Upgrade", b"Expect", b"Keep-Alive", b"Te", b"Trailer",
    b"Bad Name", b"", b"X\x7f", b"X(", b"Sec-Fetch-Site",
]) | st.binary(min_size=0, max_size=6)
_VALUE_BYTES = st.sampled_from([b"a", b"0", b"7", b" ", b"\t", b"\x7f", b"\x80", b"\xff",
                                b"\r", b"\n", b"\x00", b",", b"chunked", b"close",
                                b"keep-alive", b"100-continue", b"-1", b"+1", b"websocket"])
_VALUES = st.lists(_VALUE_BYTES, max_size=6).map(b"".join)
_SEPS = st.sampled_from([b":", b": ", b":\t", b" :", b":  ", b"::"])
_TARGET_BYTES = st.sampled_from([b"/", b"w", b"?", b"=", b"&", b"%", b"%2F", b"%zz", b"#",
                                 b" ", b"\t", b"\x00", b"\x7f", b"\x80", b"*", b"\"", b"+",
                                 b"category=c", b"http://h", b"~"])
_EOLS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"])


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """Near-valid requests, each part perhaps bent: most are simple, many are not."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"HEAD", b"post", b"GE T", b""]))
    target = draw(st.sampled_from([b"/write?category=c", b"/read", b"/", b"*", b"http://h/w"])
                  | st.lists(_TARGET_BYTES, min_size=1, max_size=6).map(b"".join))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1",
                                                       b"HTTP/1.1 ", b"HTTP/1.", b""]))
    body = draw(st.binary(max_size=40))
    eol = draw(_EOLS)
    lines = [method + b" " + target + b" " + version]
    length_header = draw(st.sampled_from(["right", "wrong", "none", "twice"]))
    if length_header in ("right", "twice"):
        lines.append(b"Content-Length: %d" % len(body))
    elif length_header == "wrong":
        lines.append(b"Content-Length: " + draw(st.sampled_from(
            [b"%d" % (len(body) + 1), b"%d" % max(len(body) - 1, 0), b"x", b"", b"1 1",
             b"0%d" % len(body), b"%d " % len(body), b"99999999999999999999999"])))
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(_NAMES) + draw(_SEPS) + draw(_VALUES))
    if length_header == "twice":
        lines.insert(draw(st.integers(1, len(lines))), b"content-length: %d" % len(body))
    data = eol.join(lines) + eol + draw(_EOLS) + body
    data += draw(st.sampled_from([b"", b"", b"", b"x", b"\r\n", b"POST / HTTP/1.1\r\n\r\n"]))
    cut = draw(st.none() | st.integers(0, len(data)))
    return data if cut is None else data[:cut]


@settings(max_examples=1500, deadline=None)
@given(_requests(), st.sampled_from([_MAX_HEAD, 60, 30]), st.sampled_from([_MAX_BODY, 10, 0]))
def test_what_it_accepts_llhttp_parses_the_same(data: bytes, max_head: int,
                                                max_body: int) -> None:
    _check(data, max_head, max_body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_declined_or_parsed_as_llhttp_does(data: bytes) -> None:
    _check(data)


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$&'*+.^_`|~",
                 min_size=1, max_size=12).map(str.encode)
_VISIBLE = st.text("".join(map(chr, range(0x21, 0x7F))), min_size=1, max_size=12).map(str.encode)
_DECLINED = {b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade", b"expect",
             b"content-length"}


_PATHS = st.lists(st.sampled_from([b"/", b"write", b"read", b"?", b"category=c", b"&", b"%41",
                                   b"a=b", b"%", b"~"]), max_size=6).map(
    lambda parts: b"/" + b"".join(parts))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"GET", b"POST"]),
       _PATHS,
       st.lists(st.tuples(_TOKEN, st.sampled_from([b":", b": ", b":\t "]),
                          st.lists(_VISIBLE, min_size=1, max_size=3).map(b" ".join)),
                max_size=5),
       st.binary(max_size=100), st.booleans())
def test_every_simple_request_is_accepted(method: bytes, target: bytes,
                                          headers: list[tuple[bytes, bytes, bytes]],
                                          body: bytes, with_length: bool) -> None:
    lines = [b"%b %b HTTP/1.1\r\n" % (method, target)]
    lines += [n + s + v + b"\r\n" for n, s, v in headers if n.lower() not in _DECLINED]
    if with_length or body:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    data = b"".join(lines) + b"\r\n" + body
    assert _check(data), data
    # Twice: the second comes from the heads kept.
    first = simple_request(data, _MAX_HEAD, _MAX_BODY)
    second = simple_request(data, _MAX_HEAD, _MAX_BODY)
    assert first is not None and second is not None
    assert first == second


def test_the_limits_and_every_cut_are_declined() -> None:
    data = b"POST /write?category=c HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabc\n"
    assert simple_request(data, _MAX_HEAD, _MAX_BODY) == (
        "POST", "/write", "category=c", {"host": "h", "content-length": "4"}, b"abc\n")
    head = data.index(b"\r\n\r\n") + 4
    assert simple_request(data, head, 4) is not None
    assert simple_request(data, head - 1, 4) is None  # the head over the limit
    assert simple_request(data, head, 3) is None  # the body over the limit
    for cut in range(len(data)):
        assert simple_request(data[:cut], _MAX_HEAD, _MAX_BODY) is None, cut
    assert simple_request(data + data, _MAX_HEAD, _MAX_BODY) is None  # pipelined: llhttp
    kept = data.replace(b"Host: h", b"Connection: keep-alive")
    assert _check(kept) and _check(kept)  # parsed, then kept
    closed = data.replace(b"Host: h", b"Connection: close")
    assert simple_request(closed, _MAX_HEAD, _MAX_BODY) is None
    assert simple_request(closed, _MAX_HEAD, _MAX_BODY) is None  # declined, then kept declined


@pytest.mark.parametrize("header", [
    b"Transfer-Encoding: chunked", b"transfer-encoding: chunked", b"Expect: 100-continue",
    b"expect: 100-continue", b"Connection: close", b"Upgrade: websocket",
    b"Proxy-Connection: keep-alive",
])
def test_a_header_that_changes_how_the_message_is_framed_or_answered_is_declined(
    header: bytes,
) -> None:
    # Deterministic, beside the Hypothesis tests (which draw these names only now and then):
    # each spelling, known to the header-name table or not, is declined.
    data = b"GET /read HTTP/1.1\r\nHost: h\r\n%b\r\n\r\n" % header
    assert simple_request(data, _MAX_HEAD, _MAX_BODY) is None
    assert simple_request(data.replace(header + b"\r\n", b""), _MAX_HEAD, _MAX_BODY) is not None


def test_the_heads_kept_are_bounded() -> None:
    http_simple._HEADS.clear()
    for i in range(http_simple._KEPT_HEADS + 10):
        assert simple_request(b"GET /read?i=%d HTTP/1.1\r\n\r\n" % i, _MAX_HEAD, 0) is not None
    assert 0 < len(http_simple._HEADS) <= http_simple._KEPT_HEADS
    http_simple._HEADS.clear()
    long_head = b"GET /read HTTP/1.1\r\nX: %b\r\n\r\n" % (b"v" * http_simple._KEPT_HEAD_SIZE)
    assert simple_request(long_head, _MAX_HEAD, 0) is not None  # parsed, not kept
    assert not http_simple._HEADS


async def test_a_handler_that_changes_its_headers_changes_only_its_own() -> None:
    seen: list[Headers] = []

    def fast(request: Request) -> Response:
        seen.append(request.headers)
        request.headers["host"] = "changed"  # the kept head's dict must not see it
        return Response(text=request.headers["host"])

    router = Router()
    router.add_routes({"/f": _unused})
    router.add_fast_routes({"/f": fast})
    server = HttpServer(router, ServerLimits())
    sock = bind_loopback()
    sock.listen(8)
    await server.start(sock)
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(3):
            writer.write(b"GET /f HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert await reader.readexactly(7) == b"changed"
        writer.close()
    finally:
        await server.stop(1.0)
    assert len(seen) == 3 and len({id(h) for h in seen}) == 3
    kept = simple_request(b"GET /f HTTP/1.1\r\nHost: a\r\n\r\n", _MAX_HEAD, 0)
    assert kept is not None and kept[3] == {"host": "a"}


async def _unused(request: Request) -> Response:
    raise AssertionError("the fast route answers")


# The same bytes through a real node, with the recogniser and without (llhttp alone): the
# same answers (but for the Date) and the same data written.
_SHAPES = [
    b"POST /write?category=c HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n1\n",
    b"POST /write?category=new HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n2\n",
    b"POST /write?category=c HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nb",
    b"POST /write?category=c HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    b"POST /write?category=c HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /write?category=c&sync=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n3\n",
    b"POST /write?category=c&sync=x HTTP/1.1\r\nContent-Length: 2\r\n\r\n3\n",
    b"POST /write?category=%63 HTTP/1.1\r\nContent-Length: 2\r\n\r\n4\n",
    b"POST /wri%74e?category=c HTTP/1.1\r\nContent-Length: 2\r\n\r\n5\n",
    b"POST /write?category=c HTTP/1.1\r\nOrigin: http://evil\r\nContent-Length: 2\r\n\r\n6\n",
    b"POST /write?category=c HTTP/1.1\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 2"
    b"\r\n\r\n7\n",
    b"POST /write?category=c HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n8\n",
    b"POST /write?category=c HTTP/1.1\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
    b"a\n",
    b"POST /write?category=c HTTP/1.0\r\nContent-Length: 2\r\n\r\n9\n",
    b"GET /read?category=c&chunk=moscow-chunk000000000&off=0&max_size=100 HTTP/1.1\r\n\r\n",
    b"GET /read?category=c&chunk=nope&off=0&max_size=100 HTTP/1.1\r\n\r\n",
    b"GET /read?category=c&chunk=moscow-chunk000000000&off=x HTTP/1.1\r\n\r\n",
    b"GET /listCategories HTTP/1.1\r\n\r\n",
    b"GET /nothing HTTP/1.1\r\n\r\n",
]


async def _answers(node: Node, shapes: list[bytes]) -> list[bytes]:
    """Each request on a connection of its own: the whole answer, Date taken out."""
    host, port = node.address.rsplit(":", 1)
    answers = []
    for data in shapes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        answers.append(b"\r\n".join(line for line in answer.split(b"\r\n")
                                    if not line.startswith(b"Date: ")))
    return answers


async def _one_pass(data_dir: Path) -> tuple[list[bytes], dict[str, bytes]]:
    """Every shape sent to a fresh node: the answers and what each category holds."""
    async with run_node(data_dir, "moscow") as node:
        await node.store.write("c", b"0\n")
        answers = await _answers(node, _SHAPES)
        held = {c: await node.store.read(c, "moscow-chunk000000000", 0, 1000)
                for c in sorted(node.store.categories())}
    return answers, held


async def test_a_node_answers_the_same_with_and_without_the_recogniser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers, held = await _one_pass(tmp_path / "with")
    assert held == {"c": b"0\n1\n3\n4\n5\n8\na\n9\n", "new": b"2\n"}  # accepted, in order
    monkeypatch.setattr(connection, "_SIMPLE_MAX", 0)  # llhttp takes every request
    assert await _one_pass(tmp_path / "without") == (answers, held)
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    # The fast path skips the access check only for requests it would let through.
    cross_site = [a for d, a in zip(_SHAPES, answers, strict=True)
                  if b"Origin:" in d or b"Sec-Fetch-Site:" in d]
    assert len(cross_site) == 2
    assert all(a.startswith(b"HTTP/1.1 403 Forbidden\r\n") for a in cross_site), cross_site


def test_checks_declare_the_headers_without_which_they_let_a_request_through() -> None:
    router = Router()
    assert router.checks_only_with == frozenset()
    router.add_check(lambda _: None, only_with=frozenset({"origin"}))
    router.add_check(lambda _: None, only_with=frozenset({"sec-fetch-site"}))
    assert router.checks_only_with == {"origin", "sec-fetch-site"}
    router.add_check(lambda _: None)  # one that looks at every request
    router.add_check(lambda _: None, only_with=frozenset({"x"}))
    assert router.checks_only_with is None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["/write", "/read", "/ack", "/retention", "/ui/x", "/groups/ack", "/x"]),
       st.sampled_from(["GET", "POST", "DELETE"]),
       st.dictionaries(st.sampled_from(["origin", "sec-fetch-site", "host", "authorization",
                                        "content-type", "referer"]),
                       st.sampled_from(["http://evil", "null", "cross-site", "same-origin",
                                        "none", "Bearer x", "t"]), max_size=4))
def test_without_tokens_the_access_check_looks_only_at_its_headers(
    path: str, method: str, headers: dict[str, str],
) -> None:
    auth = NodeAuth(None)
    assert auth.only_with is not None
    request = Request(method, path, "max_age=1", Headers(headers), b"")
    if auth.only_with.isdisjoint(headers):
        assert auth.check(request) is None  # what the fast path takes for granted
    assert NodeAuth(TokenFile(Path("unused")), auth_reads=True).only_with is None


async def test_a_head_the_parser_counts_over_the_limit_gets_431_on_the_fast_path_too() -> None:
    # The header limit counts what llhttp hands over: the target, and each header's name and
    # value plus 4. Many short headers ("a:b", 5 bytes on the wire, 6 by that count) keep the
    # head under the limit while the count goes over it: llhttp's path answers 431, and so must
    # the recogniser's.
    async def slow(request: web.Request) -> web.StreamResponse:
        return web.Response(text="slow\n")

    router = Router()
    router.add_routes({"/f": slow})
    router.add_fast_routes({"/f": lambda request: web.Response(text="fast\n")})
    server = HttpServer(router, ServerLimits(max_header_size=2048, max_body_size=1000))
    sock = bind_loopback()
    await server.start(sock)
    data = b"GET /f HTTP/1.1\r\n" + b"a:b\r\n" * 400 + b"\r\n"
    assert len(data) <= 2048 < len(b"/f") + 400 * 6
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        writer.write(data)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    finally:
        await server.stop(1.0)
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert simple_request(data, 2048, 1000) is None
    assert simple_request(data, 2401, 1000) is None  # the count is 2402
    assert simple_request(data, 2402, 1000) is not None  # at the limit: simple

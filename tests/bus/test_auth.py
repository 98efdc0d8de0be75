"""Authentication and the cross-site check on real nodes: tokens, rotation, peers, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chukcha import App, Context
from chukcha.bus.config import Peer
from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.errors import ClientError
from chukcha.processors import ProcessorConfig
from chukcha.testing import bind_loopback, run_node
from tests.integration.cluster_helpers import wait_for

TOKEN = "s3cret-token-1"  # noqa: S105 - a test token


async def token_file(path: Path, *tokens: str) -> Path:
    text = "# accepted tokens\n" + "".join(f"{t}\n" for t in tokens)
    await asyncio.to_thread(path.write_text, text)
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status_of(http: aiohttp.ClientSession, url: str, path: str,
                    params: dict[str, str] | None = None, body: bytes | None = None, *,
                    headers: dict[str, str] | None = None) -> int:
    async with http.post(f"{url}{path}", params=params or {}, data=body,
                         headers=headers or {}) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Node]:
    tokens = await token_file(tmp_path / "tokens", TOKEN, "second-token")
    async with run_node(tmp_path / "d", instance="a", max_chunk_size=100,
                        auth_token_file=tokens) as node:
        yield node


async def test_every_change_needs_a_token_and_reads_do_not(secured: Node) -> None:
    url = secured.url
    async with aiohttp.ClientSession() as http:
        assert await status_of(http, url, "/write", {"category": "c"}, b"x" * 90 + b"\n",
                               headers=bearer(TOKEN)) == 200
        assert await status_of(http, url, "/write", {"category": "c"},
                               b"y" * 20 + b"\n", headers=bearer("second-token")) == 200
        first = secured.store.list_chunks("c")[0]
        changes: list[tuple[str, dict[str, str], bytes | None]] = [
            ("/write", {"category": "c"}, b"z\n"),
            ("/groups/register", {"category": "c", "group": "g"}, None),
            ("/groups/ack", {"category": "c", "group": "g", "chunk": first.name,
                             "size": str(first.size), "from": "b"}, None),
            ("/groups/unregister", {"category": "c", "group": "g"}, None),
            ("/retention", {"category": "c", "max_age": "3600"}, None),
            ("/partitions", {"category": "pc", "count": "2"}, None),
            ("/ack", {"category": "c", "chunk": first.name, "size": str(first.size)}, None),
            ("/replication/ack", {"category": "c", "chunk": "b-chunk000000000",
                                  "instance": "b", "size": "1"}, None),
            ("/no/such/endpoint", {}, None),
        ]
        for path, params, body in changes:
            for headers in ({}, bearer("wrong"), {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):
                assert await status_of(http, url, path, params, body, headers=headers) == 401, (
                    path, headers)
        assert secured.store.list_chunks("c")[0].name == first.name  # nothing changed
        for path, params, body in changes[:-2]:
            ok = await status_of(http, url, path, params, body, headers=bearer(TOKEN))
            assert ok == 200, path
        assert secured.store.is_tombstoned("c", first.name)
        for path, params in [("/listChunks", {"category": "c"}), ("/listCategories", {}),
                             ("/retention", {"category": "c"}), ("/status", {}),
                             ("/partitions", {"category": "pc"}), ("/groups/lag", {}),
                             ("/ui", {}), ("/ui/data", {}),
                             ("/groups/list", {"category": "c"}), ("/metrics", {})]:
            assert await status_of(http, url, path, params) == 200, path
        async with http.post(f"{url}/write", params={"category": "c"}, data=b"q\n") as resp:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_auth_reads_needs_a_token_for_reads_too(tmp_path: Path) -> None:
    tokens = await token_file(tmp_path / "tokens", TOKEN)
    async with run_node(tmp_path / "d", auth_token_file=tokens, auth_reads=True) as node, \
            aiohttp.ClientSession() as http:
        for path in ("/listCategories", "/metrics", "/status"):
            assert await status_of(http, node.url, path) == 401, path
            assert await status_of(http, node.url, path, headers=bearer(TOKEN)) == 200, path


async def test_the_client_passes_its_token(secured: Node) -> None:
    async with Client([secured.url], token=TOKEN) as c:
        await c.send("c", [b"hello"])
        assert [b for b in await c.list_categories()] == ["c"]
    async with Client([secured.url]) as c:
        with pytest.raises(ClientError, match="401") as exc:
            await c.send("c", [b"hello"])
        assert exc.value.status == 401


async def test_tokens_rotate_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = await token_file(tmp_path / "tokens", "old")
    async with run_node(tmp_path / "d", auth_token_file=tokens) as node, \
            aiohttp.ClientSession() as http:
        async def code(token: str) -> int:
            return await status_of(http, node.url, "/write", {"category": "r"}, b"m\n",
                                   headers=bearer(token))

        assert (await code("old"), await code("new")) == (200, 401)
        await token_file(tokens, "new", "old")  # step 1: both accepted while clients move over

        async def both() -> bool:
            return (await code("old"), await code("new")) == (200, 200)

        await wait_for(both, timeout=10, what="the new token to be accepted")
        assert node.peer_access.headers() == bearer("new")  # peers are sent the first one
        await token_file(tokens, "new")  # step 2: the old one goes

        async def only_new() -> bool:
            return (await code("old"), await code("new")) == (401, 200)

        await wait_for(only_new, timeout=10, what="the old token to be refused")
        # A bad file keeps the tokens loaded before.
        await asyncio.to_thread(tokens.write_text, "# emptied by mistake\n")

        async def refused_file() -> bool:
            return "holds no token" in caplog.text

        await wait_for(refused_file, timeout=10, what="the bad file to be noticed")
        assert (await code("old"), await code("new")) == (401, 200)


async def test_cross_site_changes_are_refused_without_a_token(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", max_chunk_size=100) as node, \
            aiohttp.ClientSession() as http:
        evil = {"Origin": "http://evil.example"}
        assert await status_of(http, node.url, "/write", {"category": "c"}, b"x\n",
                               headers=evil) == 403
        assert await status_of(http, node.url, "/write", {"category": "c"}, b"x\n",
                               headers={"Origin": "null"}) == 403
        assert await status_of(http, node.url, "/groups/register",
                               {"category": "c", "group": "g"}, headers=evil) == 403
        assert not node.store.has_category("c")  # nothing was written
        # An <img src=".../ack?..."> GET carries no Origin, but Sec-Fetch-Site.
        assert await status_of(http, node.url, "/write", {"category": "c"}, b"y" * 90 + b"\n",
                               headers={"Origin": node.url}) == 200  # same origin: fine
        assert await status_of(http, node.url, "/write", {"category": "c"},
                               b"z" * 20 + b"\n") == 200
        first = node.store.list_chunks("c")[0]
        ack = {"category": "c", "chunk": first.name, "size": str(first.size)}
        async with http.get(f"{node.url}/ack", params=ack,
                            headers={"Sec-Fetch-Site": "cross-site"}) as resp:
            assert resp.status == 403
        async with http.get(f"{node.url}/ack", params=ack,
                            headers={"Sec-Fetch-Site": "same-site"}) as resp:
            assert resp.status == 403  # another port of the same host is another origin
        assert not node.store.is_tombstoned("c", first.name)
        # Reads from other sites stay allowed (they change nothing), and so do plain clients.
        assert await status_of(http, node.url, "/listChunks", {"category": "c"},
                               headers=evil) == 200
        assert await status_of(http, node.url, "/ack", ack) == 200
        assert node.store.is_tombstoned("c", first.name)


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path, scheme: str = "http",
                    **overrides: Any) -> AsyncIterator[tuple[Node, Node]]:
    socks = {name: bind_loopback() for name in ("a", "b")}
    peers = tuple(Peer(name, f"{scheme}://{s.getsockname()[0]}:{s.getsockname()[1]}")
                  for name, s in socks.items())
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(run_node(
                tmp_path / name, instance=name, peers=peers, listen_fd=sock.detach(),
                **overrides,
            ))
            for name, sock in socks.items()
        ]
        yield nodes[0], nodes[1]


async def replicated(a: Node, b: Node, client: Client, category: str) -> None:
    await client.send_to(a.url, category, [b"one", b"two"])

    async def there() -> bool:
        return (b.store.chunk_size(category, a.store.list_chunks(category)[0].name) or 0) > 0

    await wait_for(there, timeout=20, what=f"{category} to replicate from a to b")
    assert await client.api.read(b.url, category, a.store.list_chunks(category)[0].name, 0,
                                 1 << 20) == b"one\ntwo\n"


async def test_peers_replicate_with_auth_on(tmp_path: Path) -> None:
    tokens = await token_file(tmp_path / "tokens", TOKEN)
    async with two_nodes(tmp_path, auth_token_file=tokens, auth_reads=True) as (a, b), \
            Client([a.url, b.url], token=TOKEN) as client:
        await replicated(a, b, client, "events")
        assert [p["up"] for p in b.cluster.status()["peers"]] == [True]
        # Group changes forwarded between peers carry the token as well.
        await client.api.register_group(a.url, "events", "billing")

        async def forwarded() -> bool:
            return "billing" in b.groups.registry.groups("events")

        await wait_for(forwarded, timeout=20, what="the registration to reach b")


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=chukcha",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


async def test_a_tls_node_serves_the_client_and_its_peers(tmp_path: Path) -> None:
    cert, key = await asyncio.to_thread(make_cert, tmp_path)
    tokens = await token_file(tmp_path / "tokens", TOKEN)
    trust = await asyncio.to_thread(ssl.create_default_context, cafile=str(cert))
    async with two_nodes(tmp_path, "https", tls_cert=cert, tls_key=key, tls_ca=cert,
                         auth_token_file=tokens) as (a, b), \
            Client([a.url, b.url], token=TOKEN, ssl=trust) as client:
        assert a.url.startswith("https://")
        await replicated(a, b, client, "secure")
        # Plain HTTP to a TLS node, or TLS without trusting its certificate, fails.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                await status_of(http, a.url.replace("https", "http"), "/listCategories")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await status_of(http, a.url, "/listCategories")


async def test_an_app_passes_its_token(tmp_path: Path) -> None:
    tokens = await token_file(tmp_path / "tokens", TOKEN)
    async with run_node(tmp_path / "d", max_chunk_size=200, auth_token_file=tokens,
                        auth_reads=True) as node, Client([node.url], token=TOKEN) as client:
        app = App("counter", nodes=[node.url], state_dir=tmp_path / "state",
                  config=ProcessorConfig(token=TOKEN))
        assert TOKEN not in repr(app.config)

        @app.processor("clicks")
        def on_click(ctx: Context, click: dict[str, Any]) -> None:
            ctx.set(click["page"], ctx.get(click["page"], 0) + 1)
            ctx.emit("counted", {"page": click["page"]})

        await client.send("clicks", [{"id": f"c{i}", "page": "home"} for i in range(5)])
        stop = asyncio.Event()
        task = asyncio.create_task(app.run_async(stop))
        try:
            async def counted() -> bool:
                chunks = await client.list_chunks("counted") if "counted" in (
                    await client.list_categories()) else []
                return sum(c.size for c in chunks) > 0 and len(
                    [m for c in chunks for m in (await client.api.read(
                        node.url, "counted", c.name, 0, 1 << 20)).splitlines()]) == 5

            await wait_for(counted, timeout=30, what="the app to emit 5 events")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

"""A real headless Chromium driven over the W3C WebDriver protocol (Debian's ``chromium`` and
``chromium-driver``, installed by ``scripts/install-system-deps.sh``), for the web monitor
tests. The protocol is a few JSON requests, so no client library is needed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp

from chukcha.testing import bind_loopback

__all__ = ["Browser", "browser", "browser_missing"]

_ELEMENT: Final = "element-6066-11e4-a52e-4f735466cecf"


def browser_missing() -> str | None:
    """Why no browser test can run here (``None``: chromium and its driver are installed)."""
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"{name} is not installed (scripts/install-system-deps.sh installs it)"
    return None


class Browser:
    """One WebDriver session."""

    def __init__(self, http: aiohttp.ClientSession, base: str, session: str) -> None:
        self._http = http
        self._base = f"{base}/session/{session}"

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self._http.request(method, f"{self._base}{path}", json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"webdriver {method} {path}: {resp.status} {data}")
            return data["value"]

    async def open(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def find(self, css: str) -> str:
        found = await self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[_ELEMENT])

    async def text(self, css: str) -> str:
        """The element's rendered text, read in one step (the page replaces its ``<main>``
        every few seconds, which would make a found element stale before its text is read)."""
        found = await self._call("POST", "/execute/sync", {
            "script": "const e = document.querySelector(arguments[0]); "
                      "return e === null ? null : e.innerText;",
            "args": [css],
        })
        if found is None:
            raise LookupError(f"no element {css!r} on the page")
        return str(found)

    async def type(self, css: str, text: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click", {})

    async def script(self, source: str, *args: Any) -> Any:
        return await self._call("POST", "/execute/sync", {"script": source, "args": list(args)})


@contextlib.asynccontextmanager
async def browser(timeout: float = 30.0) -> AsyncIterator[Browser]:
    """A headless Chromium session for the block."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()  # chromedriver binds it itself right away; nothing else asks for it here
    proc = await asyncio.create_subprocess_exec(
        "chromedriver", f"--port={port}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with asyncio.timeout(timeout):
                while True:  # the driver answers /status once it listens
                    try:
                        async with http.get(f"{base}/status") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)  # polling a process that is starting
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": shutil.which("chromium"),
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run"],
                },
            }}}
            async with http.post(f"{base}/session", json=caps) as resp:
                created = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"webdriver session: {resp.status} {created}")
            session = created["value"]["sessionId"]
            try:
                yield Browser(http, base, session)
            finally:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.delete(f"{base}/session/{session}"):
                        pass
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()

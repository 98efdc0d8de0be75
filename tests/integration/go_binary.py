"""The Go Chukcha server binary for mixed-cluster tests (``../shared/bin/chukcha-go``, not part
of the project): found through ``$CHUKCHA_GO`` or a ``shared/bin`` beside the repository (or
beside its parent, for a git worktree). Tests that need it skip, saying why, where it is
absent (a user's clone)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chukcha.testing import wait_http_ready

__all__ = ["go_binary", "run_go_node"]

_ROOT = Path(__file__).resolve().parents[2]


def go_binary() -> Path:
    """The Go binary's path, or skip the calling test with the reason."""
    env = os.environ.get("CHUKCHA_GO")
    candidates = [Path(env)] if env else [
        _ROOT.parent / "shared" / "bin" / "chukcha-go",
        _ROOT.parent.parent / "shared" / "bin" / "chukcha-go",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.skip(f"the Go chukcha binary is not here (looked for {', '.join(map(str, candidates))};"
                " set CHUKCHA_GO to its path)")


def free_port() -> int:
    """A loopback port that was free a moment ago (the Go server cannot take a bound socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def run_go_node(
    binary: Path, data_dir: Path, instance: str, port: int, peers: str = ""
) -> AsyncIterator[str]:
    """Run the Go server until the block ends; yields its URL."""
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    args = [str(binary), "-instance", instance, "-dirname", str(data_dir),
            "-listen", f"127.0.0.1:{port}"]
    if peers:
        args += ["-peers", peers]
    log = await asyncio.to_thread((data_dir.parent / f"{instance}.log").open, "wb")
    proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http_ready(f"{url}/listCategories", proc)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()

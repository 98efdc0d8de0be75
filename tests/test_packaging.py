"""``pip install .`` into a fresh virtual environment, without the etcd extra: a standalone node
and an app run, ``--etcd`` says what to install, ``chukcha --version`` answers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chukcha.client import Client
from chukcha.testing import bind_loopback, wait_http_ready

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.allow_blocking, pytest.mark.timeout(600)]


async def _run(*cmd: str | Path, cwd: Path | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd), cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(540):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


APP = textwrap.dedent("""
    from chukcha import App, Context

    app = App("counter", nodes=["http://127.0.0.1:1"], state_dir="unused")

    @app.processor("words")
    def on_word(ctx: Context, event: dict) -> None:
        n = ctx.get(event["w"], 0) + 1
        ctx.set(event["w"], n)
        ctx.emit("counts", {"w": event["w"], "n": n})
""")


async def test_pip_install_without_the_etcd_extra(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    code, out = await _run(sys.executable, "-m", "venv", venv)
    assert code == 0, out
    py, cli = venv / "bin" / "python", venv / "bin" / "chukcha"
    code, out = await _run(py, "-m", "pip", "install", "--quiet", "-c",
                           ROOT / "requirements.lock", ROOT, cwd=tmp_path)
    assert code == 0, out
    assert "deprecated" not in out, out  # e.g. the license table

    # The extra is absent, and the installed package (not the checkout) is what runs.
    code, out = await _run(py, "-c", "import importlib.util, chukcha; "
                           "print(importlib.util.find_spec('aetcd') is None, chukcha.__file__)",
                           cwd=tmp_path)
    assert code == 0, out
    absent, where = out.split()
    assert absent == "True"
    assert Path(where).is_relative_to(venv)

    code, out = await _run(cli, "--version", cwd=tmp_path)
    assert (code, out.startswith("chukcha ")) == (0, True), out

    code, out = await _run(cli, "node", "--dirname", tmp_path / "x", "--listen",
                           "127.0.0.1:0", "--etcd", "http://127.0.0.1:1", cwd=tmp_path)
    assert code == 2, out
    assert "pip install 'chukcha[etcd]'" in out
    assert not (tmp_path / "x").exists()

    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    node = await asyncio.create_subprocess_exec(
        cli, "node", "--instance", "solo", "--dirname", tmp_path / "data",
        "--listen", f"{host}:{port}", "--listen-fd", str(sock.fileno()),
        pass_fds=[sock.fileno()], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = None
    try:
        await wait_http_ready(f"{url}/listCategories", node, 30)
        await asyncio.to_thread((tmp_path / "wordapp.py").write_text, APP)
        app = await asyncio.create_subprocess_exec(
            cli, "run", "wordapp:app", "--node", url, "--state-dir", tmp_path / "state",
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": ""},
        )
        async with Client([url]) as client:
            await client.send("words", [{"id": "1", "w": "a"}, {"id": "2", "w": "a"}])
            consumer = client.consumer("counts")
            seen: list[bytes] = []
            async with asyncio.timeout(60):
                while len(seen) < 2:
                    seen += [m for b in await consumer.read(timeout=1) for m in b.messages()]
                    assert app.returncode is None, "the app exited"
            await consumer.stop()
        assert [b'"n":1' in seen[0], b'"n":2' in seen[1]] == [True, True], seen
        app.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await app.wait() == 0
    finally:
        for proc in (app, node):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    await proc.wait()
        sock.close()
    assert node.returncode == 0

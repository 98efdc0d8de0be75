"""``chukcha run`` and ``make demo``: argument errors, a second instance, the demo."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from chukcha import Client
from chukcha.cli import main
from chukcha.cli.run import load_app
from chukcha.testing import run_node
from examples.demo import demo

ROOT = Path(__file__).resolve().parents[2]


def test_load_app() -> None:
    app = load_app("examples.orders:app")
    assert app.name == "billing"
    assert list(app.handlers) == ["orders"]
    assert load_app("examples.orders") is app  # attribute defaults to "app"


def test_bad_targets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    assert main(["run", "no_such_module:app", "--state-dir", str(state)]) == 2
    assert "cannot import 'no_such_module'" in caplog.text
    assert main(["run", "examples.orders:on_order", "--state-dir", str(state)]) == 2
    assert "is not a chukcha App" in caplog.text
    assert not state.exists()


@pytest.mark.allow_blocking  # subprocess orchestration
async def test_second_instance_via_cli_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with run_node(tmp_path / "data", instance="moscow") as node, \
            Client([node.url]) as client:
        cmd = [sys.executable, "-m", "chukcha", "run", "examples.orders:app",
               "--nodes", node.url, "--state-dir", str(state)]
        first = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT,
                                                     stderr=asyncio.subprocess.DEVNULL)
        try:
            await client.send("orders", [{"id": "o1", "customer": "ann", "amount": 5}])
            consumer = client.consumer("receipts")
            async with asyncio.timeout(30):  # the first instance is up and processing
                while not await consumer.read():
                    pass
            await consumer.stop()
            second = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT,
                                                          stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(30):
                _, err = await second.communicate()
            assert second.returncode == 1
            assert b"in use by another process" in err
            assert first.returncode is None  # the first one is unharmed
        finally:
            first.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                assert await first.wait() == 0


@pytest.mark.allow_blocking  # subprocess orchestration
async def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo() == 0
    out = capsys.readouterr().out
    assert "6 of them again (18 messages on the bus)" in out
    assert "every order counted exactly once" in out

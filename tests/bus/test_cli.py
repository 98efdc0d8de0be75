"""``chukcha node``: help, Go-style flags, clear errors for bad flag values."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from chukcha.bus.config import default_instance_name
from chukcha.cli import build_parser, main
from chukcha.cli import node as node_cli
from chukcha.cli.node import config_from_args
from chukcha.testing import bind_loopback, wait_http_ready
from tests.bus.conftest import Api, disk_state

pytestmark = pytest.mark.allow_blocking  # subprocess orchestration


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_lists_the_go_flags_and_ours() -> None:
    code, out, err = await run_cli("node", "--help")
    assert code == 0, err
    for flag in ("--instance", "--dirname", "--listen", "--peers", "--max-chunk-size",
                 "--rotate-chunk-interval", "--sync-each-write", "--max-batch-size"):
        assert flag in out
    assert "127.0.0.1:8080" in out
    assert "chukcha-data" in out


def test_standalone_defaults() -> None:
    config = config_from_args(build_parser().parse_args(["node"]))
    assert config.listen == ("127.0.0.1", 8080)
    assert config.data_dir == Path("chukcha-data")
    assert config.instance == default_instance_name()
    assert config.peers == ()
    assert config.max_chunk_size == 20 << 20
    assert config.rotate_interval == 600.0
    assert not config.sync_each_write


async def test_go_style_single_dash_flags_work(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    sock = bind_loopback()
    host, port = sock.getsockname()
    data = tmp_path / "godata"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "node",
        "-instance", "gonode", "-dirname", str(data), "-listen", f"{host}:{port}",
        "-listen-fd", str(sock.fileno()), "-max-chunk-size=10", "-rotate-chunk-interval", "1h30m",
        "-peers", "gonode=127.0.0.1:1", "-log-level", "WARNING",
        pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://{host}:{port}"
        await wait_http_ready(f"{url}/listCategories", proc)
        api = Api(http, url)
        await api.write("c", b"12345678\n")
        await api.write("c", b"abc\n")  # 9 + 4 > -max-chunk-size=10: a new chunk
        assert [c["name"] for c in await api.list_chunks("c")] == [
            "gonode-chunk000000000", "gonode-chunk000000001",
        ]
        proc.send_signal(signal.SIGINT)  # (the SIGTERM path is tested in test_restart)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    state = await disk_state(data)
    assert {k: v for k, v in state.items() if k != "running.lock"} == {
        "c/": 0, "c/gonode-chunk000000000": 9, "c/gonode-chunk000000001": 4,
    }


BAD_FLAGS = [
    (["--max-chunk-size", "lots"], "not a number of bytes"),
    (["-max-chunk-size", "0"], "must be positive"),
    (["--max-chunk-size", "-5"], "must be positive"),
    (["--rotate-chunk-interval", "10"], "invalid duration"),
    (["-rotate-chunk-interval", "10 minutes"], "invalid duration"),
    (["--rotate-chunk-interval", "0s"], "must be positive"),
    (["--listen", "8080"], "invalid listen address"),
    (["--listen", "host:99999"], "invalid listen address"),
    (["--instance", "a/b"], "instance"),
    (["--instance", ""], "instance"),
    (["--max-batch-size", "x"], "not a number of bytes"),
    (["--log-level", "LOUD"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS)
def test_bad_flag_values_give_one_clear_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["node", "--dirname", str(tmp_path / "d"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], err
    assert not (tmp_path / "d").exists()  # nothing started


@pytest.mark.parametrize(("args", "message"), [
    (["-max-chunk-size", "lots"], "not a number of bytes"),
    (["--peers", "nonsense"], "invalid peer"),  # refused when the configuration is built
    (["--no-such-flag"], "unrecognized arguments"),
])
async def test_bad_flags_of_the_real_command(tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = await run_cli("node", "--dirname", str(tmp_path / "d"), *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], err
    assert "Traceback" not in err
    assert not await asyncio.to_thread(os.path.exists, tmp_path / "d")


def test_a_started_node_takes_its_start_up_objects_out_of_the_collector() -> None:
    # What run_async does once the node serves: later full collections skip them.
    assert gc.get_freeze_count() == 0
    try:
        node_cli._freeze_start_up_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the modules, classes and functions loaded so far
        assert gc.get_count()[2] == 0 and not gc.get_objects(generation=2)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0

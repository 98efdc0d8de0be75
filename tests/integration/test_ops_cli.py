"""``chukcha groups`` and ``chukcha node --retain-acked`` from the command line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chukcha.cli import build_parser, main
from chukcha.cli.node import config_from_args
from chukcha.client import Client
from chukcha.testing import run_node
from tests.integration.test_client_cli import chukcha


async def test_groups_lists_each_group_with_its_lag(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", instance="k", max_chunk_size=200) as node, \
            Client([node.url]) as c:
        await c.register_group("orders", "billing")
        await c.register_group("orders", "audit")
        await c.register_group("pay", "ledger")
        for i in range(3):
            await c.send("orders", [b"%d" % i * 150])
        chunks = await c.list_chunks("orders")
        await c.api.ack(node.url, "orders", chunks[0].name, chunks[0].size, group="billing")

        code, out, err = await chukcha("groups", "orders", "--node", node.url)
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()]
        assert rows[0] == ["CATEGORY", "GROUP", "ACKED", "UNACKED", "BYTES", "OLDEST"]
        total = sum(x.size for x in chunks)
        assert [r[:5] for r in rows[1:]] == [
            ["orders", "audit", "0", "3", str(total)],
            ["orders", "billing", "1", "2", str(total - chunks[0].size)],
        ]
        assert all(r[5].endswith("s") for r in rows[1:])  # an age like 0s or 2s

        code, out, err = await chukcha("groups", "--node", node.url)
        assert code == 0, err
        assert [line.split()[:4] for line in out.splitlines()[1:]] == [
            ["orders", "audit", "0", "3"], ["orders", "billing", "1", "2"],
            ["pay", "ledger", "0", "0"],
        ]
        code, out, err = await chukcha("groups", "bad/name", "--node", node.url)
        assert code == 1
        assert "category 'bad/name'" in err, err


def test_retain_acked_flags() -> None:
    args = build_parser().parse_args(["node", "--retain-acked", "24h", "--retain-acked",
                                      "audit=1h30m", "--retain-acked", "noisy=0",
                                      "--retain-acked", "week=7d"])
    config = config_from_args(args)
    assert config.retain_acked == 86400.0
    assert config.retain_acked_categories == (
        ("audit", 5400.0), ("noisy", None), ("week", 7 * 86400.0))
    assert config_from_args(build_parser().parse_args(["node"])).retain_acked is None


@pytest.mark.parametrize(("value", "message"), [
    ("soon", "soon"), ("a/b=1h", "category"), ("=1h", "expected [CATEGORY=]"),
    ("-1h", "-1h"),
])
def test_bad_retain_acked_values_are_refused(
    tmp_path: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["node", "--dirname", str(tmp_path / "d"), f"--retain-acked={value}"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


async def test_the_cli_sends_the_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    await asyncio.to_thread(tokens.write_text, "# ours\ncli-token\n")
    async with run_node(tmp_path / "d", auth_token_file=tokens) as node:
        code, _, err = await chukcha("send", "c", "--node", node.url, stdin=b"a\n")
        assert code == 1
        assert err.splitlines()[-1].startswith("chukcha: error: unauthorized"), err
        code, _, err = await chukcha("send", "c", "--node", node.url, "--token-file",
                                     str(tokens), stdin=b"b\n")
        assert code == 0, err
        code, _, err = await chukcha("send", "c", "--node", node.url, stdin=b"c\n",
                                     env={"CHUKCHA_TOKEN": "cli-token"})
        assert code == 0, err
        code, out, err = await chukcha("tail", "c", "--node", node.url,
                                       env={"CHUKCHA_TOKEN": "cli-token"})
        assert (code, out) == (0, "b\nc\n"), err


async def test_a_bad_token_file_stops_the_node_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    await asyncio.to_thread(empty.write_text, "# nothing\n")
    for path, message in ((tmp_path / "missing", "No such file"), (empty, "holds no token")):
        code, _, err = await chukcha("node", "--dirname", str(tmp_path / "d"),
                                     "--auth-token-file", str(path), "--listen", "127.0.0.1:0")
        assert code == 2, err
        assert message in err and "Traceback" not in err, err
    code, _, err = await chukcha("node", "--dirname", str(tmp_path / "d"), "--auth-reads")
    assert code == 2 and "--auth-reads needs --auth-token-file" in err, err


async def test_the_cli_talks_to_a_tls_node(tmp_path: Path) -> None:
    from tests.bus.test_auth import make_cert  # noqa: PLC0415

    cert, key = await asyncio.to_thread(make_cert, tmp_path)
    async with run_node(tmp_path / "d", tls_cert=cert, tls_key=key) as node:
        code, out, err = await chukcha("send", "c", "--node", node.url, "--tls-ca", str(cert),
                                       stdin=b"over tls\n")
        assert code == 0, err
        code, out, err = await chukcha("tail", "c", "--node", node.url,
                                       env={"CHUKCHA_TLS_CA": str(cert)})
        assert (code, out) == (0, "over tls\n"), err
        code, _, err = await chukcha("ls", "--node", node.url)  # not trusted: a clear error
        assert code == 1 and "certificate" in err.lower(), err

"""The command line as users expect it: pipes, unknown categories, groups that leave no trace,
groups listed and removed, IDs for sent lines, ``--node`` everywhere, durations and sizes."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
import pytest

from chukcha.bus.node import Node
from chukcha.cli import build_parser
from chukcha.cli.node import config_from_args
from chukcha.cli.options import parse_duration, parse_size, tls_ca_path
from chukcha.client import Client
from chukcha.testing import run_node
from tests.integration.test_client_cli import chukcha

ROOT = Path(__file__).resolve().parent.parent.parent


async def _messages(c: Client, category: str) -> list[bytes]:
    got: list[bytes] = []
    async with c.consumer(category) as consumer:
        while not consumer.caught_up or not got:
            got += [m for b in await consumer.read(timeout=0.5) for m in b.messages()]
            if consumer.caught_up:
                break
    return got


@pytest.mark.allow_blocking
async def test_a_closed_pipe_ends_tail_quietly_with_exit_0(node: Node) -> None:
    line = b'{"pad": "%s"}' % (b"x" * 200)
    async with Client([node.url]) as c:
        await c.send("big", [line] * 5000)  # ~1 MB: far more than a pipe buffer holds
    read_end, write_end = os.pipe()  # `chukcha tail big | head -1`, with this test as head
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chukcha", "tail", "big", "--node", node.url,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        with os.fdopen(read_end, "rb") as reader:
            assert await asyncio.to_thread(reader.readline) == line + b"\n"
        # the reader is gone, as `head` exits after one line
        err = await proc.stderr.read()
        assert await proc.wait() == 0, err
    assert err == b""


async def test_tail_of_an_unknown_category_says_so_and_exits_1(node: Node) -> None:
    code, out, err = await chukcha("tail", "nosuch", "--node", node.url)
    assert (code, out) == (1, "")
    assert "no category 'nosuch'" in err and err.count("\n") == 1, err


async def test_tail_of_a_partitioned_category_names_its_partitions(node: Node) -> None:
    async with Client([node.url]) as c:
        await c.create_partitions("orders", 2)
        await c.send("orders", {"customer": "ann"}, key=lambda o: o["customer"])
    code, out, err = await chukcha("tail", "orders", "--node", node.url)
    assert (code, out) == (1, "")
    assert "orders is partitioned" in err and "orders.p0000" in err, err


async def test_tail_group_without_commit_leaves_no_group_and_groups_rm_removes_one(
    tmp_path: Path,
) -> None:
    async with run_node(tmp_path / "d", instance="kyiv", max_chunk_size=200) as n, \
            Client([n.url]) as c:
        for i in range(3):
            await c.send("g", [b"%d" % i * 150])
        code, out, err = await chukcha("tail", "g", "--group", "dbg", "--node", n.url)
        assert (code, out.splitlines()) == (0, [str(i) * 150 for i in range(3)]), err
        assert (await c.list_groups("g"))["groups"] == []  # nothing registered, nothing acked
        code, out, err = await chukcha("groups", "--node", n.url)
        assert (code, out) == (0, "no consumer groups\n"), err

        await c.register_group("g", "other")  # so that dbg's acks delete nothing
        code, _, err = await chukcha("tail", "g", "--group", "dbg", "--commit", "--node", n.url)
        assert code == 0, err
        code, out, err = await chukcha("groups", "ls", "g", "--node", n.url)
        assert code == 0, err
        # CATEGORY GROUP ACKED UNACKED BYTES OLDEST: dbg acked the two complete chunks.
        assert sorted(line.split()[:5] for line in out.splitlines()[1:]) == [
            ["g", "dbg", "2", "1", "151"], ["g", "other", "0", "3", "453"]], out
        # The group has acked what it printed: a peek as that group skips it.
        code, out, err = await chukcha("tail", "g", "--group", "dbg", "--node", n.url)
        assert (code, out.splitlines()) == (0, ["2" * 150]), err

        code, out, err = await chukcha("groups", "rm", "dbg", "--category", "g",
                                       "--node", n.url)
        assert (code, out) == (0, "removed group dbg of g\n"), err
        assert [g["name"] for g in (await c.list_groups("g"))["groups"]] == ["other"]
        code, _, err = await chukcha("groups", "rm", "dbg", "--category", "g", "--node", n.url)
        assert code == 1 and "no group 'dbg'" in err
        code, _, err = await chukcha("groups", "rm", "dbg", "--node", n.url)
        assert code == 1 and "--category" in err
        code, _, err = await chukcha("tail", "g", "--commit", "--node", n.url)
        assert code == 1 and "--commit needs --group" in err


async def test_send_auto_id_gives_the_same_ids_when_a_file_is_sent_again(
    node: Node, tmp_path: Path,
) -> None:
    path = tmp_path / "e.ndjson"
    lines = [b'{"n": 1}', b'{"n": 1}', b'{"id": "own", "n": 2}', b"", b'{"n": 3}']
    await asyncio.to_thread(path.write_bytes, b"\n".join(lines))
    for _ in range(2):
        code, _, err = await chukcha("send", "a", str(path), "--auto-id", "--node", node.url)
        assert code == 0 and err.startswith("sent 4 events"), err
    async with Client([node.url]) as c:
        events = [orjson.loads(m) for m in await _messages(c, "a")]
    ids = [e["id"] for e in events]
    assert len(ids) == 8 and ids[:4] == ids[4:]  # the second send repeats the IDs
    assert len(set(ids[:4])) == 4  # two equal lines are still two events
    assert ids[2] == "own" and [e["n"] for e in events[:4]] == [1, 1, 2, 3]


async def test_send_id_field_and_its_errors(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "e.ndjson"
    await asyncio.to_thread(path.write_bytes, b'{"key": "k1"}\n{"key": 7}\n')
    code, _, err = await chukcha("send", "f", str(path), "--id-field", "key", "--node", node.url)
    assert code == 0, err
    async with Client([node.url]) as c:
        assert [orjson.loads(m)["id"] for m in await _messages(c, "f")] == ["k1", 7]

    await asyncio.to_thread(path.write_bytes, b'{"key": "k2"}\n{"other": 1}\n')
    code, _, err = await chukcha("send", "h", str(path), "--id-field", "key", "--node", node.url)
    assert code == 1 and "line 2 has no string or integer field 'key'" in err, err
    await asyncio.to_thread(path.write_bytes, b"plain text\n")
    code, _, err = await chukcha("send", "h", str(path), "--auto-id", "--node", node.url)
    assert code == 1 and "line 1 is not a JSON object" in err, err
    code, _, err = await chukcha("send", "h", str(path), "--auto-id", "--id-field", "k",
                                 "--node", node.url)
    assert code == 2


@pytest.mark.allow_blocking
async def test_run_takes_its_nodes_from_the_environment(node: Node, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "run", "examples.orders:app",
        "--state-dir", str(tmp_path / "state"), cwd=ROOT,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "CHUKCHA_NODES": node.url},  # the app's own node is :8080
    )
    try:
        async with Client([node.url]) as c:
            await c.send("orders", [{"id": "o1", "customer": "ann", "amount": 5}])
            async with c.consumer("receipts") as consumer, asyncio.timeout(30):
                while not await consumer.read():
                    pass
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


def test_every_client_command_takes_node_repeatedly() -> None:
    parser = build_parser()
    for argv in (["send", "c"], ["tail", "c"], ["ls"], ["status"], ["retention", "c"],
                 ["groups"], ["groups", "rm", "g"], ["partitions", "c"], ["app", "status", "a"],
                 ["run", "examples.orders:app"]):
        args = parser.parse_args([*argv, "--node", "a:1", "--node", "b:2"])
        assert args.node == ["a:1", "b:2"], argv


def test_every_argument_of_every_command_is_explained() -> None:
    parser = build_parser()
    commands: dict[str, argparse.ArgumentParser] = next(
        a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands) >= {"send", "tail", "ls", "groups", "partitions", "run", "app"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"chukcha {name}: {action.dest} has no help text"


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("1.5s", 1.5), ("10m", 600), ("1h30m", 5400), ("7d", 604800),
    ("2w", 1209600), ("50ms", 0.05), ("1d12h", 129600),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), [
    ("1000", 1000), ("64KiB", 65536), ("20MB", 20_000_000), ("1GiB", 1 << 30),
    ("2 GB", 2_000_000_000), ("1.5KiB", 1536), ("10kb", 10000),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_plain_seconds_only_where_asked() -> None:
    assert parse_duration("90", plain_seconds=True) == 90
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("90")  # as Go's flags: a unit is needed


@pytest.mark.parametrize("text", ["", "soon", "7 days", "1y", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "lots", "1.5B", "3 MiBs", "5 KiB B"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_node_flags_take_units() -> None:
    args = build_parser().parse_args([
        "node", "--rotate-chunk-interval", "1d", "--dead-peer-timeout", "2w",
        "--max-chunk-size", "64KiB", "--max-batch-size", "8MB", "--etcd-lease-ttl", "1m",
    ])
    config = config_from_args(args)
    assert (config.rotate_interval, config.max_chunk_size, config.max_batch_size) == (
        86400, 65536, 8_000_000)
    assert config.replication.dead_peer_timeout == 14 * 86400
    assert args.etcd_lease_ttl == 60
    parser = build_parser()
    assert parser.parse_args(["run", "m:app", "--lease-ttl", "30s"]).lease_ttl == 30
    assert parser.parse_args(["run", "m:app", "--lease-ttl", "15"]).lease_ttl == 15  # seconds


async def test_retention_takes_days_and_sizes(node: Node) -> None:
    code, out, err = await chukcha("retention", "r", "--max-age", "7d", "--max-bytes", "10GiB",
                                   "--node", node.url)
    assert code == 0, err
    assert "max age 168h0m0s, max bytes 10737418240" in out, out
    policy = node.groups.registry.retention("r")
    assert (policy.max_age, policy.max_bytes) == (7 * 86400, 10 << 30)


def test_tls_ca_from_the_flag_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("CHUKCHA_TLS_CA", " /env/ca.pem ")
    for argv in (["ls"], ["run", "m:app"]):
        assert tls_ca_path(parser.parse_args(argv)) == "/env/ca.pem"
        assert tls_ca_path(parser.parse_args([*argv, "--tls-ca", "/flag.pem"])) == "/flag.pem"
    monkeypatch.delenv("CHUKCHA_TLS_CA")
    assert tls_ca_path(parser.parse_args(["ls"])) is None

"""Bad cluster settings are refused up front, with a clear message, before anything starts."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from chukcha.bus.config import NodeConfig, Peer, parse_etcd_endpoint
from chukcha.bus.coordination import StaticMembership


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--etcd", "ftp://127.0.0.1:2379"], "invalid etcd endpoint 'ftp://127.0.0.1:2379'"),
        (["--etcd", "http://127.0.0.1:99999"], "invalid etcd endpoint"),
        (["--etcd", "http://127.0.0.1:2379", "--cluster", "a/b"], "invalid cluster name"),
        (["--peers", "b=127.0.0.1:1,broken"], "invalid peer 'broken'"),
        (["--etcd-lease-ttl", "1"], "lease_ttl"),
        (["--replication-poll-wait", "2m"], "poll_wait"),
    ],
)
async def test_node_refuses_bad_cluster_flags(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "node", "--dirname", str(data),
        "--listen", "127.0.0.1:0", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 2, out
    assert message in out.decode(), out
    assert not await asyncio.to_thread(data.exists)  # nothing was started or created


def test_etcd_endpoint_forms() -> None:
    assert parse_etcd_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_etcd_endpoint("127.0.0.1:23790") == ("127.0.0.1", 23790)
    assert parse_etcd_endpoint("http://etcd") == ("etcd", 2379)
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        parse_etcd_endpoint("http://127.0.0.1:2379/v3")


def test_static_membership_ignores_this_node() -> None:
    config = NodeConfig("a", Path("unused"), peers=(Peer("a", "x:1"), Peer("b", "y:2")))
    members = StaticMembership(config.peers, "a")
    assert dict(members.peers()) == {"b": Peer("b", "y:2")}
    assert members.connected

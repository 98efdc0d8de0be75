"""A former owner's snapshot must not delete the new owner's changelog (a real node with real
etcd; the claims are real etcd keys, their ``mod_revision`` the epochs).

A paused owner that resumes lets its loops finish their batch and commit; a commit that crosses
``snapshot_every`` publishes a snapshot (readers ignore it: it is off the chain) and then acks
the changelog chunks that were complete before it. Those chunks hold the new owner's records:
the node must refuse the zombie's acks (fenced by its partition and epoch, as input acks are),
so a later restore still finds the new owner's chain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from chukcha import App, Client
from chukcha.bus.app_coordination import claim_key
from chukcha.errors import RequestRejectedError
from chukcha.processors.busio import BusIO
from chukcha.processors.changelog import Changelog, changelog_category
from chukcha.processors.engine import CommitPlan
from chukcha.processors.follower import Follower
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import EtcdServer, etcd_binary, run_etcd, run_node

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]  # stores opened inline

APP = "fenced"
CLUSTER = "zf"


class Owner:
    """One ownership of partition 0 at ``epoch`` (a claim in etcd): commits through a real
    :class:`Changelog` into its own store and publishes each record, as the checkpoint does."""

    def __init__(self, store: LevelDBStore, bus: BusIO, epoch: int,
                 snapshot_every: int = 0) -> None:
        self.store = store
        self.changelog = Changelog(APP, 0, bus, epoch=epoch, snapshot_every=snapshot_every,
                                   fenced=True)
        self.changelog.load(store)

    async def commit(self, puts: dict[bytes, bytes]) -> None:
        extra, done = self.changelog.stage(CommitPlan(puts, [], 1))
        self.store.write({**puts, **extra}, list(done), sync=False)
        self.changelog.committed()
        await self.changelog.publish()


async def claim(etcd: EtcdServer, owner: str) -> int:
    """Claim partition 0 for ``owner`` (a put of the claim key); returns the epoch."""
    etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
    proc = await asyncio.create_subprocess_exec(
        etcdctl, "--endpoints", etcd.endpoint, "-w", "json", "put",
        claim_key(CLUSTER, APP, 0).decode(), owner, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    return int(orjson.loads(out)["header"]["revision"])


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


@pytest.fixture
async def bus(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[BusIO]:
    async with run_node(tmp_path / "node", max_chunk_size=4096,
                        etcd_endpoints=(etcd.endpoint,), cluster=CLUSTER) as node, \
            Client([node.url]) as client:
        yield BusIO(App(APP, nodes=[node.url]), client, {})


async def restored(tmp_path: Path, name: str, bus: BusIO) -> dict[bytes, bytes]:
    """What a new store rebuilt from the bus holds."""
    store = LevelDBStore(tmp_path / name)
    await Follower(changelog_category(APP, 0), 0, store, bus).catch_up()
    return dict(store.scan(b"t/"))


async def test_a_zombies_snapshot_deletes_nothing_of_the_new_owners_changelog(
    tmp_path: Path, etcd: EtcdServer, bus: BusIO
) -> None:
    a, b = LevelDBStore(tmp_path / "a"), LevelDBStore(tmp_path / "b")
    zombie = Owner(a, bus, await claim(etcd, "z"), snapshot_every=15)
    for i in range(10):
        await zombie.commit({f"t/z{i}".encode(): b"a" * 200})

    # The zombie is paused past its lease; b claims the partition, catches up, goes on.
    await Follower(changelog_category(APP, 0), 0, b, bus).catch_up()
    new = Owner(b, bus, await claim(etcd, "b"))
    for i in range(30):
        await new.commit({f"t/n{i}".encode(): b"b" * 200})
    want = dict(b.scan(b"t/"))
    chunks = {name for name, _ in await bus.complete_chunks(changelog_category(APP, 0))}
    assert len(chunks) > 2  # the new owner's records fill complete chunks

    # The zombie resumes and commits past its snapshot threshold: a snapshot, then its acks.
    for _ in range(5):
        await zombie.commit({b"t/zombie": b"late"})
    assert zombie.changelog.snapshots == 1
    left = {name for name, _ in await bus.complete_chunks(changelog_category(APP, 0))}
    assert left >= chunks  # its acks were refused: nothing deleted

    # The new owner's disk is lost: the bus still holds its whole chain.
    assert await restored(tmp_path, "c", bus) == want


async def test_the_owners_snapshot_acks_the_chunks_before_it(
    tmp_path: Path, etcd: EtcdServer, bus: BusIO
) -> None:
    owner = Owner(LevelDBStore(tmp_path / "a"), bus, await claim(etcd, "a"), snapshot_every=30)
    for i in range(29):
        await owner.commit({f"t/k{i}".encode(): b"a" * 200})
    before = await bus.complete_chunks(changelog_category(APP, 0))
    assert before
    await owner.commit({b"t/last": b"x"})
    assert owner.changelog.snapshots == 1
    left = {name for name, _ in await bus.complete_chunks(changelog_category(APP, 0))}
    assert not left & {name for name, _ in before}  # the fenced acks were taken
    assert await restored(tmp_path, "c", bus) == dict(owner.store.scan(b"t/"))


async def test_an_app_with_claims_takes_only_fenced_acks(
    tmp_path: Path, etcd: EtcdServer, bus: BusIO
) -> None:
    """An instance of the app outside its etcd group (no fence: started without etcd) acks
    neither the group's input nor a partition's changelog while the app holds claims."""
    api, url = bus._client.api, bus.nodes[0]
    for category in ("orders", changelog_category(APP, 0)):
        for _ in range(3):
            await bus.send(category, [b"x" * 3000])
    await bus._client.register_group("orders", APP)
    orders = await bus.complete_chunks("orders")
    changelog = await bus.complete_chunks(changelog_category(APP, 0))
    assert orders and changelog
    epoch = await claim(etcd, "a")
    with pytest.raises(RequestRejectedError, match="must be fenced"):
        await api.ack(url, "orders", *orders[0], group=APP)
    with pytest.raises(RequestRejectedError, match="must be fenced"):
        await api.ack(url, changelog_category(APP, 0), *changelog[0])
    assert await bus.complete_chunks("orders") == orders  # nothing acked away
    assert await bus.complete_chunks(changelog_category(APP, 0)) == changelog
    # The owner's fenced acks are taken.
    await api.ack(url, "orders", *orders[0], group=APP, fence=(0, epoch))
    await api.ack(url, changelog_category(APP, 0), *changelog[0], fence=(0, epoch), app=APP)
    assert orders[0] not in await bus.complete_chunks("orders")
    assert changelog[0] not in await bus.complete_chunks(changelog_category(APP, 0))
    # Another app's changelog and groups are not concerned.
    for _ in range(2):
        await bus.send("other.changelog.p0000", [b"y" * 3000])
    other = await bus.complete_chunks("other.changelog.p0000")
    await api.ack(url, "other.changelog.p0000", *other[0])
    assert other[0] not in await bus.complete_chunks("other.changelog.p0000")

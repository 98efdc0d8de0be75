"""Instances of an app share its partitions through a real etcd, as real processes: balanced,
minimal moves on a join, take-over after a SIGKILL, adoption on a quick restart, refusal of
another partition count."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha.bus.app_coordination import AppView, read_app
from chukcha.testing import EtcdServer, run_cluster, run_etcd, run_node
from tests.integration.cluster_helpers import list_chunks, wait_for, write

# Subprocess orchestration; and grpc joins a thread when the test's last etcd channel closes.
pytestmark = [pytest.mark.timeout(180), pytest.mark.allow_blocking]

CLUSTER, APP, PARTITIONS = "test", "billing", 12


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with run_etcd(tmp_path) as server:
        yield server


class Member:
    """``tests.integration.app_member`` as a subprocess."""

    def __init__(self, tmp_path: Path, etcd: str, instance: str, *, ttl: int = 2,
                 partitions: int = PARTITIONS, extra: tuple[str, ...] = ()) -> None:
        self.instance = instance
        self.args = ["--etcd", etcd, "--cluster", CLUSTER, "--app", APP, "--instance", instance,
                     "--partitions", str(partitions), "--ttl", str(ttl), *extra]
        self.log = tmp_path / f"member-{instance}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = await asyncio.to_thread(self.log.open, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.integration.app_member", *self.args,
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await self.proc.wait()
        return self.proc.returncode or 0

    async def events(self) -> list[dict[str, Any]]:
        """The partition events it printed (JSON lines; the log lines are in between)."""
        lines = (await self.output()).splitlines()
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    async def output(self) -> str:
        return await asyncio.to_thread(self.log.read_text, errors="replace")


@pytest.fixture
async def members(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[Callable[..., Member]]:
    made: list[Member] = []

    def make(instance: str, **kw: Any) -> Member:
        m = Member(tmp_path, etcd.endpoint, instance, **kw)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            await m.kill()


async def wait_view(etcd: EtcdServer, check: Callable[[AppView], bool], what: str,
                    timeout: float = 60.0) -> AppView:
    view = AppView()
    try:
        async with asyncio.timeout(timeout):
            while True:
                view = await read_app((etcd.endpoint,), CLUSTER, APP)
                if check(view):
                    return view
                await asyncio.sleep(0.1)  # polling etcd for a condition, bounded above
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}; last view {view.to_json()}") from None


def held(events: list[dict[str, Any]]) -> set[int]:
    """The partitions a member processes after ``events`` (replayed in order)."""
    now: set[int] = set()
    for e in events:
        if e["event"] == "assigned":
            now.add(e["partition"])
        else:
            now.discard(e["partition"])
    return now


def settled(names: set[str]) -> Callable[[AppView], bool]:
    """Every partition claimed by one of ``names``, all of them members, balanced."""
    def check(view: AppView) -> bool:
        counts = Counter(c.owner for c in view.claims.values())
        return (set(view.members) == names and len(view.claims) == PARTITIONS
                and set(counts) == names and max(counts.values()) - min(counts.values()) <= 1)
    return check


async def test_instances_balance_take_fair_shares_and_take_over_a_killed_one(
    etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    a, b, c = members("a"), members("b"), members("c")
    for m in (a, b, c):
        await m.start()
    first = await wait_view(etcd, settled({"a", "b", "c"}), "a, b, c to share 12 partitions")
    assert first.partitions == PARTITIONS

    # A fourth instance takes exactly its fair share (3), only from the others' surplus, and the
    # partitions that stay keep their epoch.
    d = members("d")
    await d.start()
    second = await wait_view(etcd, settled({"a", "b", "c", "d"}), "d to take its share")
    moved = {p for p, cl in first.claims.items() if second.claims[p].owner != cl.owner}
    assert len(moved) == 3
    assert {second.claims[p].owner for p in moved} == {"d"}
    for p, cl in first.claims.items():
        if p not in moved:
            assert second.claims[p].epoch == cl.epoch
        else:
            assert second.claims[p].epoch > cl.epoch

    # SIGKILL b: when its lease (2 s) expires, a, c and d claim its partitions, with new epochs.
    await b.kill()
    third = await wait_view(etcd, settled({"a", "c", "d"}), "b's partitions to be taken over")
    for p, cl in second.claims.items():
        if cl.owner == "b":
            assert third.claims[p].epoch > cl.epoch
        else:
            assert third.claims[p] == cl  # nothing else moved
    assert '"event": "lost"' not in await a.output()

    # A graceful stop hands c's partitions over (revoking, then released).
    assert await c.stop() == 0
    fourth = await wait_view(etcd, settled({"a", "d"}), "c's partitions to move on SIGTERM")
    assert all(cl.owner in ("a", "d") for cl in fourth.claims.values())
    # Its last words: the revocation of each partition it held, one by one, before it left.
    held = {p for p, cl in third.claims.items() if cl.owner == "c"}
    tail = (await c.events())[-len(held):]
    assert {e["partition"] for e in tail if e["event"] == "revoking"} == held


async def test_a_quick_restart_adopts_its_partitions_with_new_epochs(
    etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    a, b = members("a", ttl=30), members("b", ttl=30)
    await a.start()
    await b.start()
    before = await wait_view(etcd, settled({"a", "b"}), "a and b to share the partitions")
    # SIGKILL and restart b at once: its old lease (30 s) still holds its claims.
    await b.kill()
    b2 = members("b", ttl=30)
    await b2.start()

    def adopted(view: AppView) -> bool:
        return settled({"a", "b"})(view) and all(
            view.claims[p].epoch > cl.epoch for p, cl in before.claims.items() if cl.owner == "b")

    after = await wait_view(etcd, adopted, "b to adopt its claims", timeout=25)
    assert after.owners() == before.owners()  # sticky: the same partitions, no move
    for p, cl in before.claims.items():
        if cl.owner == "a":
            assert after.claims[p] == cl
    assert "took over from its previous incarnation" in await b2.output()


async def test_another_partition_count_is_refused_with_a_clear_error(
    etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    a = members("a")
    await a.start()
    await wait_view(etcd, settled({"a"}), "a to claim every partition")
    other = members("x", partitions=8)
    await other.start()
    assert other.proc is not None
    async with asyncio.timeout(30):
        assert await other.proc.wait() == 1
    assert "has 12 partitions in etcd, this instance was started with 8" in await other.output()
    view = await read_app((etcd.endpoint,), CLUSTER, APP)
    assert set(view.members) == {"a"} and view.partitions == PARTITIONS


async def test_etcd_outage_stops_partitions_after_the_lease_and_resumes_them(
    etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    a, b = members("a"), members("b")
    await a.start()
    await b.start()
    await wait_view(etcd, settled({"a", "b"}), "a and b to share the partitions")
    await etcd.stop()

    async def stopped_all(m: Member) -> bool:
        events = await m.events()
        return any(e["event"] == "lost" for e in events) and not held(events)

    for m in (a, b):  # ownership can no longer be proven
        await wait_for(functools.partial(stopped_all, m), what=f"{m.instance} to stop all")
    await etcd.start()

    async def resumed() -> bool:
        # Consistent at one moment: etcd's claims are what each member processes. (Right after
        # etcd's restart the old claims can still show until their leases expire there.)
        view = await read_app((etcd.endpoint,), CLUSTER, APP)
        if not settled({"a", "b"})(view):
            return False
        for m in (a, b):
            if held(await m.events()) != {p for p, cl in view.claims.items()
                                          if cl.owner == m.instance}:
                return False
        return True

    await wait_for(resumed, timeout=60, what="a and b to process the partitions etcd gives them")


async def groups_of(http: aiohttp.ClientSession, url: str, category: str) -> dict[str, Any]:
    async with http.get(f"{url}/groups/list", params={"category": category}) as resp:
        assert resp.status == 200, await resp.text()
        return {g["name"]: g["acked"] for g in (await resp.json())["groups"]}


async def test_a_zombie_owner_is_fenced_at_the_node(
    tmp_path: Path, etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    """SIGSTOP the owner of a partition past its lease, another instance takes it over, SIGCONT:
    the old owner stops processing it by itself, and the ack it would send with its old epoch
    is refused by the node (etcd transaction on the claim's epoch); the new owner's is taken."""
    async with run_cluster(tmp_path / "nodes", ("n1",), etcd=etcd.endpoint,
                           args=("--max-chunk-size", "64")) as cluster, \
            aiohttp.ClientSession() as http:
        url = cluster["n1"].url
        for body in (b"x" * 80 + b"\n", b"y" * 80 + b"\n"):
            assert (await write(http, url, "orders", body)).status == 200
        async with http.post(f"{url}/groups/register",
                             params={"category": "orders", "group": APP}) as resp:
            assert resp.status == 200, await resp.text()
        first = await list_chunks(http, url, "orders")
        chunk, size = first[0]["name"], first[0]["size"]
        assert first[0]["complete"]

        a = members("a", partitions=1)
        await a.start()
        owned = await wait_view(etcd, lambda v: 0 in v.claims, "a to claim partition 0")
        old = owned.claims[0]
        assert old.owner == "a"

        a.signal(signal.SIGSTOP)
        b = members("b", partitions=1)
        await b.start()
        taken = await wait_view(etcd, lambda v: 0 in v.claims and v.claims[0].owner == "b",
                                "b to take partition 0 over after a's lease expired")
        new = taken.claims[0]
        assert new.epoch > old.epoch
        a.signal(signal.SIGCONT)

        async def a_stopped() -> bool:
            events = await a.events()
            return events[-1]["event"] == "lost" and not held(events)

        await wait_for(a_stopped, what="the resumed zombie to stop processing partition 0")

        def ack(epoch: int, **extra: str) -> Any:
            return http.post(f"{url}/ack", params={
                "category": "orders", "chunk": chunk, "size": str(size), "group": APP,
                "partition": "0", "epoch": str(epoch), **extra})

        async with ack(old.epoch) as resp:
            assert resp.status == 409, await resp.text()
            assert "must stop processing" in await resp.text()
        assert chunk not in (await groups_of(http, url, "orders"))[APP]
        async with ack(new.epoch, partition="oops") as resp:
            assert resp.status == 400
        async with ack(new.epoch) as resp:
            assert resp.status == 200, await resp.text()

        async def tombstoned() -> bool:
            return chunk not in {c["name"] for c in await list_chunks(http, url, "orders")}

        await wait_for(tombstoned, what="the new owner's ack to tombstone the chunk")


async def test_a_fenced_ack_needs_a_node_with_etcd(tmp_path: Path) -> None:
    async with run_node(tmp_path / "data") as node, aiohttp.ClientSession() as http:
        url = node.url
        assert (await write(http, url, "orders", b"1\n")).status == 200
        async with http.post(f"{url}/ack", params={
            "category": "orders", "chunk": "test-chunk000000000", "size": "2",
            "partition": "0", "epoch": "5"}) as resp:
            assert resp.status == 400
            assert "--etcd" in await resp.text()
        assert [c["name"] for c in await list_chunks(http, url, "orders")] == [
            "test-chunk000000000"]


async def chukcha_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_app_status_shows_instances_claims_epochs_and_lag(
    tmp_path: Path, etcd: EtcdServer, members: Callable[..., Member]
) -> None:
    a, b = members("a"), members("b")
    await a.start()
    await b.start()
    view = await wait_view(etcd, settled({"a", "b"}), "a and b to share the partitions")
    async with run_node(tmp_path / "data", max_chunk_size=64) as node, \
            aiohttp.ClientSession() as http:
        for group in (APP, f"{APP}.0of2", "other"):
            async with http.post(f"{node.url}/groups/register",
                                 params={"category": "orders", "group": group}) as resp:
                assert resp.status == 200, await resp.text()
        for _ in range(3):
            assert (await write(http, node.url, "orders", b"z" * 70 + b"\n")).status == 200
        base = ["app", "status", APP, "--etcd", etcd.endpoint, "--cluster", CLUSTER,
                "--node", node.url]
        code, out = await chukcha_cli(*base, "--json")
        assert code == 0, out
        status = orjson.loads(out)
        assert status["partitions"] == PARTITIONS
        assert {m: i["partitions"] for m, i in status["instances"].items()} == {
            m: sorted(p for p, c in view.claims.items() if c.owner == m) for m in ("a", "b")}
        assert status["claims"] == {str(p): {"owner": c.owner, "epoch": c.epoch,
                                             "standbys": [], "standbys_ready": []}
                                    for p, c in view.claims.items()}
        assert {lag["group"] for lag in status["lag"]} == {APP, f"{APP}.0of2"}
        assert all(lag["chunks"] >= 2 for lag in status["lag"])

        code, out = await chukcha_cli(*base)
        assert code == 0, out
        assert "12 partitions, 2 instance(s)" in out
        assert "INSTANCE" in out and "EPOCH" in out and f"{APP}.0of2" in out
        assert "other" not in out
        code, out = await chukcha_cli("app", "status", "bad/name", "--node", node.url)
        assert code != 0

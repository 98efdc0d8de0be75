"""A partition whose owner is lost goes to a standby whose copy is ``ready`` (caught up) before
one still catching up, whatever their names: real ``app_member`` processes, real etcd, the
owner SIGKILLed and its lease left to expire."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chukcha.testing import EtcdServer
from tests.integration.test_app_instances import Member, etcd, members, wait_view

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_blocking]  # subprocess orchestration

__all__ = ["etcd", "members"]


@pytest.mark.parametrize("ready", ["b", "c"])
async def test_a_lost_partition_goes_to_the_ready_standby(
    etcd: EtcdServer, members: Callable[..., Member], ready: str
) -> None:
    standbys = ("--standbys", "2")
    a = members("a", partitions=1, extra=standbys)
    await a.start()
    await wait_view(etcd, lambda v: 0 in v.claims and v.claims[0].owner == "a",
                    "a to own the partition")
    # b and c both follow partition 0; only one of them says its copy caught up.
    b = members("b", partitions=1, extra=(*standbys, *(("--ready", "0") if ready == "b" else ())))
    c = members("c", partitions=1, extra=(*standbys, *(("--ready", "0") if ready == "c" else ())))
    for m in (b, c):
        await m.start()
    await wait_view(etcd, lambda v: (set(v.members) == {"a", "b", "c"}
                                     and v.claims[0].owner == "a"
                                     and v.standbys.get(0) == {"b", "c"}
                                     and v.ready.get(0) == {ready}),
                    "b and c standbys of partition 0, only one ready")
    await a.kill()  # its lease expires after 2 s; its claim with it
    view = await wait_view(etcd, lambda v: 0 in v.claims and v.claims[0].owner != "a",
                           "partition 0 taken over")
    assert view.claims[0].owner == ready, view.to_json()
    other = b if ready == "c" else c
    assert not [e for e in await other.events() if e["event"] == "assigned"]

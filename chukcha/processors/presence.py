"""Detecting a second instance of an app run without etcd, through the bus itself.

Two processes of the same app (or of the same ``--instance-index`` of a static split) started
without etcd, on any machines and with any state directories, would both process the same
partitions. The bus is the one thing they share, so each instance announces itself there: on
start and every :data:`HEARTBEAT_INTERVAL` seconds it writes one small JSON line, a heartbeat,
to the category ``<app>.instances``::

    {"run": "<random id of this run>", "host": "...", "pid": 1234, "state_dir": "/abs/path",
     "index": 0, "count": 1, "time": 1767139200.0, "left": false}

Before processing anything, an instance reads the recent heartbeats from every node it knows;
a heartbeat of another run whose partitions overlap this one's (the same app without a split,
the same index of a split, or a split against no split) and whose ``time`` is less than
:data:`DETECTION_WINDOW` seconds old means another live instance: the start is refused with
:class:`~chukcha.errors.DuplicateInstanceError` naming the other's host, pid and state
directory. A running instance checks again with every heartbeat and stops (the same error,
nonzero exit) before processing more if it sees another's fresh heartbeat (two started at
once both stop). Heartbeats are told apart by host and state directory (its lock rules out
two live processes there): the newest one of each stands for the instance there, and the same
host and state directory is this instance itself, so a restart after SIGKILL is never refused;
a clean stop writes a last heartbeat with ``"left": true`` so another state directory may take
over at once. The clocks of the machines
must agree within a few seconds (the window is many heartbeats long).

Traffic stays tiny and bounded: one line of about 200 bytes per instance per interval; a read
looks only at the last :data:`TAIL_BYTES` of the newest chunks, and complete chunks older than
the newest complete one are acked away.

**Instances through etcd** (``--etcd``) coordinate their partitions there, and heartbeat here
too, with ``"etcd": "<cluster>"`` and ``"etcd_id": "<the etcd cluster's ID>"``: so an instance
run without etcd and one through etcd of the same app detect each other (an etcd instance may
own any partition, so they always overlap), and so do instances of two clusters: two
``--cluster`` names, or one name on two etcd clusters (two groups that would each share the
partitions out in their own etcd). Instances of one cluster never refuse each other; a
heartbeat without ``etcd_id`` (an older release) is taken as the same etcd cluster. An instance
through etcd learns the ID (``identify``) before its first check, retrying while etcd does not
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from chukcha.client import Client
from chukcha.errors import ClientError, CoordinationTimeoutError, DuplicateInstanceError
from chukcha.processors.split import StaticSplit

__all__ = ["DETECTION_WINDOW", "HEARTBEAT_INTERVAL", "TAIL_BYTES", "Heartbeat", "Presence",
           "instances_category"]

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL: Final = 3.0
"""Seconds between an instance's heartbeats (and its checks for another instance)."""

DETECTION_WINDOW: Final = 15.0
"""A heartbeat younger than this (seconds) is a live instance."""

TAIL_BYTES: Final = 64 << 10
"""How much of the end of each of the newest chunks a check reads, per node."""


def instances_category(app: str) -> str:
    """The category the heartbeats of ``app`` go to."""
    return f"{app}.instances"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One instance's announcement."""

    run: str
    host: str
    pid: int
    state_dir: str
    index: int
    count: int
    time: float
    left: bool = False
    etcd: str = ""
    """The cluster name (``--cluster``) of an instance run through etcd (empty: without)."""
    etcd_id: str = ""
    """The ID of that instance's etcd cluster (empty: without etcd, or an older release)."""

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "run": self.run, "host": self.host, "pid": self.pid, "state_dir": self.state_dir,
            "index": self.index, "count": self.count, "time": self.time, "left": self.left}
        if self.etcd:
            fields["etcd"] = self.etcd
        if self.etcd_id:
            fields["etcd_id"] = self.etcd_id
        return orjson.dumps(fields)

    @classmethod
    def decode(cls, line: bytes) -> Heartbeat | None:
        """The heartbeat in ``line``; ``None`` for anything else (a torn or foreign line)."""
        try:
            d: Any = orjson.loads(line)
            return cls(str(d["run"]), str(d["host"]), int(d["pid"]), str(d["state_dir"]),
                       int(d["index"]), int(d["count"]), float(d["time"]), bool(d["left"]),
                       str(d.get("etcd") or ""), str(d.get("etcd_id") or ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def where(self) -> str:
        split = f" instance {self.index} of {self.count}" if self.count > 1 else ""
        etcd_id = f", etcd cluster id {self.etcd_id}" if self.etcd_id else ""
        mode = f" through etcd (cluster {self.etcd}{etcd_id})" if self.etcd else " without etcd"
        return f"host {self.host} pid {self.pid} state dir {self.state_dir}{split}{mode}"


class Presence:
    """This run's heartbeats and the checks for another live instance of the app."""

    def __init__(self, app: str, partitions: int, state_dir: Path, split: StaticSplit,
                 client: Client, *, etcd: str = "",
                 identify: Callable[[], Awaitable[str]] | None = None) -> None:
        """``etcd``: the cluster name of an instance run through etcd (empty: without etcd);
        ``identify``: returns its etcd cluster's ID (raising :class:`CoordinationTimeoutError`
        while etcd does not answer: retried; any other error ends the start), asked once
        before the first check."""
        self.app = app
        self._etcd = etcd
        self._etcd_id = ""
        self._identify = identify
        self.category = instances_category(app)
        self._partitions = partitions
        self._split = split
        self._owned = set(split.owned(partitions))
        self._client = client
        self._run = uuid.uuid4().hex
        self._host = socket.gethostname()
        self._path = Path(state_dir)
        self._state_dir = str(state_dir)  # made absolute by start()

    def _beat(self, *, left: bool = False) -> Heartbeat:
        return Heartbeat(self._run, self._host, os.getpid(), self._state_dir, self._split.index,
                         self._split.count, time.time(), left, self._etcd, self._etcd_id)

    def _overlaps(self, other: Heartbeat) -> bool:
        if self._etcd or other.etcd:
            # Through etcd an instance may own any partition: it overlaps anything but the
            # instances of its own cluster, which share the partitions out through etcd: the
            # same name in the same etcd cluster (a heartbeat without the ID: an older release).
            return self._etcd != other.etcd or bool(
                self._etcd_id and other.etcd_id and self._etcd_id != other.etcd_id)
        if other.count < 1 or not 0 <= other.index < other.count:
            return True  # malformed: be safe
        theirs = StaticSplit(other.index, other.count)
        return any(theirs.owns(p) for p in self._owned)

    async def check(self) -> None:
        """Raise :class:`DuplicateInstanceError` if another live instance overlaps this one."""
        # One live process at most per state directory (its lock): the newest heartbeat of a
        # (host, state dir) says whether the instance there runs, whichever run wrote it.
        latest: dict[tuple[str, str], Heartbeat] = {}
        for beat in await self._read_recent():
            seen = latest.get(where := (beat.host, beat.state_dir))
            if seen is None or (beat.time, beat.left) >= (seen.time, seen.left):
                latest[where] = beat
        now = time.time()
        for (host, state_dir), beat in latest.items():
            if host == self._host and state_dir == self._state_dir:
                continue  # this state directory: this run, or its previous run (killed)
            if beat.left or now - beat.time >= DETECTION_WINDOW:
                continue
            if not self._overlaps(beat):
                continue
            age = max(0.0, now - beat.time)
            raise DuplicateInstanceError(
                f"app {self.app!r}: another instance is running ({beat.where()}, last heartbeat "
                f"{age:.1f}s ago in {self.category!r}); both would process the same partitions. "
                f"{self._advice(beat)}; a killed instance counts as gone "
                f"{DETECTION_WINDOW:g}s after its last heartbeat")

    def _advice(self, other: Heartbeat) -> str:
        if other.etcd and not self._etcd:
            return (f"Stop it, or run this one through etcd too (--etcd URL --cluster "
                    f"{other.etcd}) to share the partitions with it")
        if self._etcd and not other.etcd:
            return ("Stop it (it runs without etcd), or restart it through etcd (--etcd URL "
                    f"--cluster {self._etcd}) to share the partitions with this one")
        if self._etcd and self._etcd == other.etcd:
            return (f"Instances of one app must use one etcd cluster: this one's is "
                    f"{self._etcd_id} (cluster name {self._etcd}), the other's "
                    f"{other.etcd_id}; give them the same --etcd endpoints, or stop one of them")
        if self._etcd:
            return (f"Instances of one app must use one etcd cluster (this one: "
                    f"{self._etcd}); stop one of them")
        return ("Stop the other one, or give each its own share with --instances N "
                "--instance-index I, or run them as a group through etcd (--etcd URL)")

    async def announce(self) -> None:
        """Write a heartbeat (and ack away old complete chunks of the category)."""
        await self._client.send(self.category, [self._beat().encode()])

    async def leave(self) -> None:
        """A last heartbeat saying this run stopped (best effort)."""
        try:
            async with asyncio.timeout(5):
                await self._client.send(self.category, [self._beat(left=True).encode()])
        except (ClientError, TimeoutError) as exc:
            logger.warning("app=%s could not announce the stop in %s: %s", self.app,
                           self.category, exc)

    async def start(self, stop: asyncio.Event, *, retry_initial: float = 0.1,
                    retry_max: float = HEARTBEAT_INTERVAL) -> None:
        """The check before processing anything, then the first heartbeat and a check again
        (two instances starting at once both see each other). While no node answers, tries
        again (logged; the delay doubles from ``retry_initial`` to ``retry_max``) until one
        does or ``stop`` is set."""
        delay = retry_initial
        self._state_dir = str(await asyncio.to_thread(self._path.resolve))
        while True:
            try:
                if self._identify is not None and not self._etcd_id:
                    self._etcd_id = await self._identify()
                await self.check()
                await self.announce()
                await self.check()
                break
            except (ClientError, CoordinationTimeoutError) as exc:
                logger.warning("app=%s cannot check for another instance yet (%s); trying "
                               "again in %gs", self.app, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, retry_max)
            if stop.is_set():
                return
        logger.info("app=%s no other instance found; heartbeats every %gs in %s", self.app,
                    HEARTBEAT_INTERVAL, self.category)

    async def watch(self, lock: asyncio.Lock, stop: asyncio.Event) -> None:
        """Heartbeat and check every interval until ``stop``; on another live instance, raise
        (under ``lock``, i.e. between two batches) so that the app stops before processing
        more. A node that does not answer is logged and tried again next time."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL)
            if stop.is_set():
                return
            try:
                await self.announce()
                await self.check()
            except DuplicateInstanceError:
                async with lock:
                    logger.error("app=%s stopping: another instance of the app is running",  # noqa: TRY400
                                 self.app)
                    raise
            except ClientError as exc:
                logger.warning("app=%s heartbeat in %s failed: %s", self.app, self.category, exc)

    async def _read_recent(self) -> list[Heartbeat]:
        """The heartbeats at the end of the newest chunks on every node that answers."""
        api = self._client.api
        beats: list[Heartbeat] = []
        answered = 0
        errors: list[str] = []
        for url in self._client.nodes:
            try:
                chunks = await api.list_chunks(url, self.category)
                complete = [c for c in chunks if c.complete]
                for old in complete[:-1]:  # bounded: keep only the newest complete chunk
                    with contextlib.suppress(ClientError):
                        await api.ack(url, self.category, old.name, old.size)
                for info in chunks[-2:]:
                    off = max(0, info.size - TAIL_BYTES)
                    data = await api.read(url, self.category, info.name, off, TAIL_BYTES + 4096)
                    lines = data.split(b"\n")
                    if off > 0:
                        lines = lines[1:]  # started inside a line
                    beats.extend(b for line in lines if line and (b := Heartbeat.decode(line)))
            except ClientError as exc:
                errors.append(f"{url}: {exc}")
                continue
            answered += 1
        if not answered:
            raise ClientError(f"no node answered reading {self.category!r}: {'; '.join(errors)}")
        return beats

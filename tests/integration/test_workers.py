"""``chukcha node --workers N``: a SIGKILLed worker is restarted, nothing answered 200 is lost or
doubled, SIGTERM stops every process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import ssl
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from chukcha.testing import NodeProcess, bind_loopback
from chukcha.testing_node import terminate
from tests.integration.cluster_helpers import read_all, wait_for

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _children_or_none(pid: int) -> list[int]:
    try:
        return _children(pid)
    except OSError:  # the supervisor is gone (and reaped): so are its children
        return []


def _gone(pids: list[int]) -> bool:
    """Every process exited (a zombie waiting for its reaper counts as exited)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return False
    return True


def _holds_lock(pid: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(str(p.readlink()).endswith("running.lock") for p in fds.iterdir())
    return False


async def _wait_for_children(pid: int, count: int, exclude: set[int]) -> list[int]:
    """The ``count`` children of ``pid``, none of them in ``exclude`` (polled: the supervisor
    does not announce them)."""
    kids: list[int] = []

    async def ready() -> bool:
        nonlocal kids
        kids = await asyncio.to_thread(_children, pid)
        return len(kids) == count and not exclude.intersection(kids)

    await wait_for(ready, 60, f"{count} workers of {pid}, none of {sorted(exclude)}")
    return kids


async def _close_and_stop(
    node: NodeProcess, conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> None:
    for _, writer in conns:
        writer.close()
    await node.stop()
    node.close()


async def _spread_lines(tmp_path: Path) -> list[bytes]:
    """The sorted lines of category ``spread``'s first chunk."""
    chunk = tmp_path / "data" / "spread" / "w-chunk000000000"
    return sorted((await asyncio.to_thread(chunk.read_bytes)).splitlines())


async def _assert_answered_stored_once(url: str, category: str, answered: list[bytes]) -> None:
    """Every write answered 200 is in ``category``, and no message is stored twice."""
    async with aiohttp.ClientSession() as http:
        stored = await read_all(http, url, category)
    counts = Counter(stored)
    assert not [m for m, n in counts.items() if n > 1], "a message was stored twice"
    missing = set(answered) - set(counts)
    assert not missing, f"{len(missing)} of {len(answered)} writes answered 200 are not stored"


@pytest.mark.parametrize("victim", ["front", "writer"])
async def test_a_worker_killed_during_sync_writes_is_restarted_and_nothing_answered_is_lost(
    tmp_path: Path, victim: str
) -> None:
    node = NodeProcess(tmp_path / "data", "w", ["--workers", "4", "--log-level", "WARNING"])
    await node.start()
    try:
        assert node.proc is not None
        sup = node.proc.pid
        kids = await _wait_for_children(sup, 4, set())
        writer = [k for k in kids if await asyncio.to_thread(_holds_lock, k)]
        assert len(writer) == 1, kids
        target = writer[0] if victim == "writer" else next(k for k in kids if k != writer[0])
        answered: list[bytes] = []
        flowing = asyncio.Event()  # writes are being answered through every worker
        killed = asyncio.Event()
        after_kill = 0

        async def client(name: str) -> None:
            nonlocal after_kill
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for i in range(100_000):
                    msg = b"%s-%06d" % (name.encode(), i)
                    try:
                        async with http.post(f"{node.url}/write",
                                             params={"category": "pay", "sync": "1"},
                                             data=msg + b"\n") as resp:
                            await resp.read()
                            ok = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False  # unknown fate: may be stored, never twice
                    if ok:
                        answered.append(msg)
                        if len(answered) >= 300:
                            flowing.set()
                        if killed.is_set():
                            after_kill += 1
                    if killed.is_set() and after_kill >= 400:
                        return

        clients = [asyncio.create_task(client(f"c{n}")) for n in range(16)]
        async with asyncio.timeout(60):
            await flowing.wait()
        os.kill(target, signal.SIGKILL)
        killed.set()
        # The supervisor restarts it, and writes keep being answered.
        await _wait_for_children(sup, 4, {target})
        async with asyncio.timeout(90):
            await asyncio.gather(*clients)
        await _assert_answered_stored_once(node.url, "pay", answered)
    finally:
        code = await node.stop()
        node.close()
    assert code == 0
    assert await asyncio.to_thread(_gone, await asyncio.to_thread(_children_or_none, sup))


async def test_sigterm_stops_every_worker_and_the_data_stays(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", "w", ["--workers", "3"])
    await node.start()
    try:
        assert node.proc is not None
        kids = await _wait_for_children(node.proc.pid, 3, set())
        big = b"".join(b"%06d " % i + b"q" * 900 + b"\n" for i in range(3000))  # ~2.7 MB
        async with aiohttp.ClientSession() as http:
            for i in range(20):
                async with http.post(f"{node.url}/write", params={"category": "c"},
                                     data=b"m%d\n" % i) as resp:
                    assert resp.status == 200
            async with http.post(f"{node.url}/write", params={"category": "big"},
                                 data=io.BytesIO(big)) as resp:
                assert resp.status == 200
        # Big answers are relayed piece by piece by the fronts: whole whoever answers.
        for _ in range(6):
            async with aiohttp.ClientSession() as http, http.get(f"{node.url}/read", params={
                    "category": "big", "chunk": "w-chunk000000000", "off": "0",
                    "max_size": str(16 << 20)}) as resp:
                assert resp.status == 200
                assert await resp.read() == big
    finally:
        code = await node.stop()  # SIGTERM to the supervisor (also when an assert failed)
        node.close()
    assert code == 0
    assert await asyncio.to_thread(_gone, kids)
    chunk = tmp_path / "data" / "c" / "w-chunk000000000"
    data = await asyncio.to_thread(chunk.read_bytes)
    assert sorted(data.splitlines()) == sorted(b"m%d" % i for i in range(20))



async def test_a_stop_signal_right_after_a_worker_is_forked_stops_the_node(
    tmp_path: Path,
) -> None:
    # The supervisor is told to stop (SIGTERM) just after it forked a front, which gets the
    # supervisor's SIGTERM before it has dropped the handlers it inherited
    # (tests/integration/stop_in_fork_window.py chooses that moment). Every process still
    # exits, with code 0. Before, the front ran the supervisor's handler, then went on
    # serving, and the supervisor waited for it forever.
    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    data = tmp_path / "data"
    log = await asyncio.to_thread((tmp_path / "node.log").open, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.stop_in_fork_window", "node",
            "--instance", "w", "--dirname", str(data), "--listen",
            f"{host}:{port}", "--listen-fd", str(sock.fileno()),
            "--workers", "2", pass_fds=[sock.fileno()], stdout=log, stderr=log)
    finally:
        log.close()
        sock.close()
    try:
        async with asyncio.timeout(60):  # the injected wait is 10 s at most
            code = await proc.wait()
    except TimeoutError:
        kids = await asyncio.to_thread(_children_or_none, proc.pid)
        proc.kill()
        await proc.wait()
        for kid in kids:  # they die with the supervisor; not left waiting for that
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        log_text = await asyncio.to_thread((tmp_path / "node.log").read_text)
        raise AssertionError(f"the node did not stop; its log:\n{log_text}") from None
    assert code == 0


async def test_a_sigkilled_supervisor_leaves_no_worker_running(tmp_path: Path) -> None:
    # The workers ask the kernel to SIGKILL them when the supervisor dies (prctl
    # PR_SET_PDEATHSIG): no worker goes on holding the data directory and the port.
    node = NodeProcess(tmp_path / "data", "w", ["--workers", "3"])
    url = node.url
    await node.start()
    try:
        assert node.proc is not None
        kids = await _wait_for_children(node.proc.pid, 3, set())
        assert await asyncio.to_thread(lambda: any(_holds_lock(k) for k in kids))
        await node.kill()

        async def all_gone() -> bool:
            return await asyncio.to_thread(_gone, kids)

        await wait_for(all_gone, 30, "every worker gone after the supervisor's SIGKILL")
    finally:
        await node.kill()  # (done already unless an assert failed)
        node.close()  # the test's copy of the listening socket
    async with aiohttp.ClientSession() as http:  # the port is nobody's now
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/listCategories")


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _held_connections(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to ``port`` each process holds open."""
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    held = {}
    for pid in pids:
        held[pid] = sum(
            1 for fd in Path(f"/proc/{pid}/fd").iterdir()
            if (link := str(fd.readlink())).startswith("socket:[") and link[8:-1] in inodes)
    return held


async def _write_on(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], msg: bytes) -> int:
    reader, writer = conn
    writer.write(b"POST /write?category=spread HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b"
                 % (len(msg), msg))
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Length: 0\r\n" in head, head
    return int(head[9:12])


@pytest.mark.parametrize("workers", [2, 3])
async def test_clients_are_spread_over_every_accepting_worker(tmp_path: Path, workers: int) -> None:
    # One listening socket per accepting worker (SO_REUSEPORT): the kernel spreads connections
    # by their addresses, so 64 land on each socket (each with probability 1 - 2**-63 at
    # least). With 2 workers the writer takes its share; with more it takes none (its core is
    # for the fronts' batches), so every client is a front's.
    node = NodeProcess(tmp_path / "data", "w", ["--workers", str(workers)])
    await node.start()
    conns = []
    try:
        assert node.proc is not None
        kids = await _wait_for_children(node.proc.pid, workers, set())
        names = {k: await asyncio.to_thread(_comm, k) for k in kids}
        assert sorted(names.values()) == ["chukcha-front"] * (workers - 1) + ["chukcha-writer"]
        host, port = node.address.rsplit(":", 1)
        for _ in range(64):
            conns.append(await asyncio.open_connection(host, int(port)))
        # Each answered: accepted by the process that holds it now (a small write stays there).
        assert [await _write_on(c, b"m%d\n" % i) for i, c in enumerate(conns)] == [200] * 64
        held = await asyncio.to_thread(_held_connections, kids, int(port))
        assert sum(held.values()) == 64, held
        for kid, n in held.items():
            if names[kid] == "chukcha-writer" and workers > 2:
                assert n == 0, held
            else:
                assert n > 0, (names, held)
    finally:
        await _close_and_stop(node, conns)
    assert await _spread_lines(tmp_path) == sorted(b"m%d" % i for i in range(64))


async def test_clients_waiting_for_a_killed_front_are_served_by_its_successor(
    tmp_path: Path,
) -> None:
    # Each front accepts on its own listening socket, which the supervisor keeps open: a
    # connection that waits in it while its front is dead is accepted and answered by the
    # front restarted in its place (a socket that died with its front would reset them).
    node = NodeProcess(tmp_path / "data", "w", ["--workers", "3", "--log-level", "WARNING"])
    await node.start()
    conns = []
    try:
        assert node.proc is not None
        sup = node.proc.pid
        kids = await _wait_for_children(sup, 3, set())
        fronts = [k for k in kids if await asyncio.to_thread(_comm, k) == "chukcha-front"]
        stopped, live = fronts
        os.kill(stopped, signal.SIGSTOP)
        host, port = node.address.rsplit(":", 1)
        for _ in range(32):
            conns.append(await asyncio.open_connection(host, int(port)))
        writes = [asyncio.create_task(_write_on(c, b"k%d\n" % i)) for i, c in enumerate(conns)]

        async def live_answered_its_share() -> bool:
            held = await asyncio.to_thread(_held_connections, [live], int(port))
            return sum(w.done() for w in writes) == held[live] > 0

        await wait_for(live_answered_its_share, 30, "the live front answering its clients")
        waiting = [w for w in writes if not w.done()]
        assert waiting, "no connection landed on the stopped front's socket"
        os.kill(stopped, signal.SIGKILL)
        await _wait_for_children(sup, 3, {stopped})
        async with asyncio.timeout(30):
            assert await asyncio.gather(*writes) == [200] * 32
    finally:
        await _close_and_stop(node, conns)
    assert await _spread_lines(tmp_path) == sorted(b"k%d" % i for i in range(32))


async def test_a_tls_node_on_three_workers_serves_writes_and_reads(tmp_path: Path) -> None:
    # With 3 workers only the fronts accept clients, and under TLS they relay every request to
    # the writer (a TLS session cannot be handed over): small writes, a big write and reads.
    from tests.bus.test_auth import make_cert  # noqa: PLC0415

    cert, key = await asyncio.to_thread(make_cert, tmp_path)
    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    log = await asyncio.to_thread((tmp_path / "node.log").open, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chukcha", "node", "--instance", "w", "--dirname",
            str(tmp_path / "data"), "--listen", f"{host}:{port}", "--listen-fd",
            str(sock.fileno()), "--workers", "3", "--tls-cert", str(cert), "--tls-key", str(key),
            pass_fds=[sock.fileno()], stdout=log, stderr=log)
    finally:
        log.close()
    url = f"https://{host}:{port}"
    tls = ssl.create_default_context(cafile=str(cert))
    big = b"".join(b"%06d " % i + b"t" * 200 + b"\n" for i in range(5000))  # ~1 MB
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/listCategories") as resp:
                        return resp.status == 200
                return False

            await wait_for(ready, 60, "the TLS node answering")

            async def write(body: bytes) -> int:
                async with http.post(f"{url}/write", params={"category": "t"},
                                     data=body) as resp:
                    return resp.status

            assert await asyncio.gather(*(write(b"s%d\n" % i) for i in range(32))) == [200] * 32
            assert await write(big) == 200
            async with http.get(f"{url}/read", params={
                    "category": "t", "chunk": "w-chunk000000000", "off": "0",
                    "max_size": str(4 << 20)}) as resp:
                assert resp.status == 200
                data = await resp.read()
    finally:
        code = await terminate(proc, 30.0)
        sock.close()
    assert code == 0
    lines = data.splitlines()
    assert sorted(lines[:32]) == sorted(b"s%d" % i for i in range(32))
    assert b"\n".join(lines[32:]) + b"\n" == big


async def test_a_second_node_on_the_port_of_a_workers_node_refuses_to_start(
    tmp_path: Path,
) -> None:
    # The workers' listening sockets share their port (SO_REUSEPORT), but a second node
    # started on it by mistake must fail as before ("address already in use"), not join them
    # and silently take a share of the first node's clients into another data directory.
    node = NodeProcess(tmp_path / "a", "a", ["--workers", "2", "--log-level", "WARNING"])
    await node.start()
    second: asyncio.subprocess.Process | None = None
    try:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chukcha", "node", "--instance", "b",
            "--dirname", str(tmp_path / "b"), "--listen", node.address, "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(60):
            out, _ = await second.communicate()
        assert second.returncode == 1, out
        assert b"Address already in use" in out, out
    finally:
        if second is not None and second.returncode is None:
            second.kill()
            await second.wait()
        await node.stop()
        node.close()

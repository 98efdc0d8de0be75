"""The listening sockets of ``chukcha node --workers N``
(:func:`chukcha.cli.workers._listening_sockets`): one per accepting worker, joined with
``SO_REUSEPORT``, or the given one alone where that fails."""

from __future__ import annotations

import socket
from pathlib import Path

from chukcha.bus.config import NodeConfig
from chukcha.cli.workers import _listening_sockets
from chukcha.testing import bind_loopback


def _accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def _close(socks: list[socket.socket]) -> None:
    """The made ones; the first is another object on the given socket's descriptor."""
    socks[0].detach()
    for s in socks[1:]:
        s.close()


def _config(tmp_path: Path, sock: socket.socket) -> NodeConfig:
    return NodeConfig("w", tmp_path, listen=sock.getsockname()[:2], listen_fd=sock.fileno())


def test_each_worker_gets_a_socket_on_the_port_and_the_kernel_spreads_clients(
    tmp_path: Path,
) -> None:
    given = bind_loopback()
    socks = _listening_sockets(_config(tmp_path, given), 3)
    try:
        assert len(socks) == 3 and socks[0].fileno() == given.fileno()
        assert {s.getsockname() for s in socks} == {given.getsockname()}
        clients = [socket.create_connection(given.getsockname()) for _ in range(96)]
        # The kernel has put each connection in one socket's queue (connect returned).
        counts = [_accept_all(s) for s in socks]
        assert sum(counts) == 96 and min(counts) > 0, counts  # each empty: p = 3 * (2/3)**96
        for c in clients:
            c.close()
    finally:
        _close(socks)
        given.close()


def test_a_given_socket_without_the_option_joins_while_nothing_waits_in_it(
    tmp_path: Path,
) -> None:
    given = socket.socket()
    given.bind(("127.0.0.1", 0))
    given.listen(16)
    socks = _listening_sockets(_config(tmp_path, given), 2)
    try:
        assert len(socks) == 2
    finally:
        _close(socks)
        given.close()


def test_a_given_socket_that_cannot_be_joined_is_shared(tmp_path: Path) -> None:
    # A connection already waiting in a socket bound without SO_REUSEPORT was accepted without
    # the option, so the port refuses another listener: every worker then shares the one
    # socket, and the waiting client is still served from it.
    given = socket.socket()
    given.bind(("127.0.0.1", 0))
    given.listen(16)
    waiting = socket.create_connection(given.getsockname())
    try:
        socks = _listening_sockets(_config(tmp_path, given), 3)
        assert [s.fileno() for s in socks] == [given.fileno()]
        _close(socks)
        assert _accept_all(given) == 1
    finally:
        waiting.close()
        given.close()

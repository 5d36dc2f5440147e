"""Fixtures of the media unit tests that touch real sockets: an ICE mux on loopback and
client sockets to talk to it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from services.media.icemux import IceMux


@pytest.fixture
async def mux() -> AsyncIterator[IceMux]:
    running = IceMux("127.0.0.1")
    await running.start()
    yield running
    running.close()


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """40 client sockets, each on a port of its own: reuseport hashing would spread their
    datagrams over a group's sockets if nothing steered them."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    yield socks
    for sock in socks:
        sock.close()

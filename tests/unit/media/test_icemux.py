"""The ICE mux: one socket for all sessions, addresses learned only from authenticated
binding requests."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from aioice import stun
from aioice.ice import Connection

from services.media.icemux import IceMux, MuxedStunProtocol


def binding_request(connection: Connection, password: str) -> bytes:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{connection.local_username}:remote"
    request.attributes["PRIORITY"] = 1
    request.attributes["ICE-CONTROLLING"] = 1
    request.add_message_integrity(password.encode())
    return bytes(request)


async def receive(sock: socket.socket, timeout: float = 1.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    except TimeoutError:
        return None


async def attached(mux: IceMux) -> Connection:
    connection = Connection(ice_controlling=False)
    mux.attach(connection)
    await connection.gather_candidates()
    return connection


async def test_an_authenticated_request_binds_the_address(
    mux: IceMux, client: socket.socket
) -> None:
    connection = await attached(mux)
    client.sendto(binding_request(connection, connection.local_password), ("127.0.0.1", mux.port))
    response = await receive(client)
    assert response is not None, "aioice answered through the mux"
    message = stun.parse_message(response)
    assert message.message_class == stun.Class.RESPONSE
    assert message.attributes["XOR-MAPPED-ADDRESS"] == client.getsockname()
    protocol = connection._protocols[0]
    assert isinstance(protocol, MuxedStunProtocol)
    assert protocol.addresses == {client.getsockname()}

    # Non-STUN data from the bound address goes to the connection (DTLS path) ...
    client.sendto(b"\x16dtls", ("127.0.0.1", mux.port))
    await asyncio.sleep(0.05)
    assert connection._queue.get_nowait() == (b"\x16dtls", 1)
    # ... and SRTP to the session's handler once it has one.
    seen: list[bytes] = []
    protocol.srtp_handler = lambda data, received: seen.append(data)
    client.sendto(b"\x80\x6fsrtp", ("127.0.0.1", mux.port))
    await asyncio.sleep(0.05)
    assert seen == [b"\x80\x6fsrtp"]

    await connection.close()
    assert mux.sessions() == 0
    client.sendto(b"\x80\x6fmore", ("127.0.0.1", mux.port))
    await asyncio.sleep(0.05)
    assert seen == [b"\x80\x6fsrtp"], "a closed session's address is forgotten"


async def test_forged_and_unknown_requests_bind_nothing(mux: IceMux, client: socket.socket) -> None:
    connection = await attached(mux)
    client.sendto(binding_request(connection, "w" * 22), ("127.0.0.1", mux.port))
    client.sendto(b"\x16not-stun-from-a-stranger", ("127.0.0.1", mux.port))
    stranger = Connection(ice_controlling=False)  # never attached
    client.sendto(binding_request(stranger, stranger.local_password), ("127.0.0.1", mux.port))
    assert await receive(client, timeout=0.3) is None
    protocol = connection._protocols[0]
    assert isinstance(protocol, MuxedStunProtocol) and protocol.addresses == set()
    await connection.close()
    await stranger.close()


async def test_ufrags_are_unique_and_long(mux: IceMux) -> None:
    ufrags = {mux.new_ufrag() for _ in range(200)}
    assert len(ufrags) == 200 and all(len(u) == 12 for u in ufrags)


async def test_arrival_times_come_from_the_kernel(mux: IceMux, client: socket.socket) -> None:
    """A datagram that waited in the socket is stamped with when it arrived, so the
    forwarding latency includes queueing before media read it."""
    connection = await attached(mux)
    client.sendto(binding_request(connection, connection.local_password), ("127.0.0.1", mux.port))
    assert await receive(client) is not None
    protocol = connection._protocols[0]
    assert isinstance(protocol, MuxedStunProtocol)
    seen: list[float] = []
    protocol.srtp_handler = lambda data, received: seen.append(received)

    loop = asyncio.get_running_loop()
    loop.remove_reader(mux.fd)  # nobody reads for a while
    client.sendto(b"\x80\x6fsrtp", ("127.0.0.1", mux.port))
    time.sleep(0.05)
    mux._readable()
    waited = time.perf_counter() - seen[0]
    assert 0.045 < waited < 0.5
    loop.add_reader(mux.fd, mux._readable)
    await connection.close()


async def test_send_sockets_share_the_port_and_never_take_its_traffic(
    mux: IceMux, clients: list[socket.socket]
) -> None:
    fds = mux.send_sockets(3)
    assert len(fds) == 3, "this kernel takes SO_REUSEPORT and its BPF steering"
    senders = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    arrived: list[bytes] = []
    mux.dispatch = lambda data, address, received=0.0: arrived.append(data)  # type: ignore[method-assign]
    try:
        for i, client in enumerate(clients):
            client.sendto(b"\x80\x6f" + bytes([i]), ("127.0.0.1", mux.port))
        for _ in range(50):
            if len(arrived) == len(clients):
                break
            await asyncio.sleep(0.02)
        assert sorted(arrived) == sorted(b"\x80\x6f" + bytes([i]) for i in range(40))
        for sender in senders:
            with pytest.raises(BlockingIOError):
                sender.recv(2048)
            # What they send comes from the mux's address and port.
            sender.sendto(b"hi", clients[0].getsockname())
            data, source = clients[0].recvfrom(2048)
            assert (data, source) == (b"hi", ("127.0.0.1", mux.port))
    finally:
        for sock in senders:
            sock.close()


async def test_a_second_mux_on_a_taken_port_fails_loudly(mux: IceMux) -> None:
    with pytest.raises(OSError):
        await IceMux("127.0.0.1", mux.port).start()

"""Batched egress on real loopback sockets: every listener gets the shared packet, SRTP
protected with its own keys, through one ``sendmmsg`` per chunk. Every plan test runs
twice: the native C loop (built by ``make``) and the Python loop it replaces; protection
is libsrtp's or the fast path's own AES-GCM (``GcmSender``), and libsrtp decrypts."""

from __future__ import annotations

import asyncio
import os
import select
import socket

import pytest
from prometheus_client import REGISTRY
from pylibsrtp import Policy, Session

from services.media.egress import (
    MAX_PLAINTEXT,
    EgressHandle,
    EgressPool,
    FanoutHelpers,
    ShardPlan,
    sockaddr_bytes,
)
from services.media.icemux import IceMux
from services.media.metrics import FORWARD_LATENCY
from services.media.rtp import build_header
from services.media.srtp_native import GcmSender, gcm_available

GCM256 = (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44)
CM80 = (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30)


class Listener:
    """A UDP socket and the SRTP session that decrypts what media sends it."""

    def __init__(
        self, profile: tuple[int, int] = GCM256, repeat_tx: bool = True, gcm: bool = False
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)
        key = os.urandom(profile[1])
        tx = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile[0])
        tx.allow_repeat_tx = repeat_tx
        rx = Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile[0])
        self.tx = Session(tx)
        self.rx = Session(rx)
        self.gcm = GcmSender(key[:32], key[32:]) if gcm else None

    def handle(self, fd: int) -> EgressHandle:
        return EgressHandle("s", self.tx, fd, self.sock.getsockname(), gcm=self.gcm)

    def receive(self) -> bytes:
        return self.rx.unprotect(self.sock.recv(2048))

    def received_nothing(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0.05)
        return not readable


@pytest.fixture
def sender(client: socket.socket) -> socket.socket:
    """The socket the egress sends from (``conftest.client``)."""
    return client


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    """Which fan-out loop the plan runs."""
    return bool(request.param)


def test_the_native_loop_is_built_and_used_by_default(sender: socket.socket) -> None:
    assert ShardPlan(sender.fileno(), chunk=4).native, "make builds _spaces_media_fanout"


def sent_total() -> float:
    return REGISTRY.get_sample_value("spaces_media_packets_sent_total") or 0


def test_sockaddr_encoding() -> None:
    v4 = sockaddr_bytes(("127.0.0.1", 5000))
    assert len(v4) == 16 and v4[2:4] == (5000).to_bytes(2, "big") and v4[4:8] == b"\x7f\0\0\1"
    v6 = sockaddr_bytes(("::1", 5000))
    assert len(v6) == 28 and v6[2:4] == (5000).to_bytes(2, "big") and v6[23] == 1


def test_the_native_aes_gcm_is_available_here() -> None:
    assert gcm_available(), "x86-64 with AES-NI and PCLMULQDQ runs the fast path's AES-GCM"


@pytest.mark.parametrize(
    ("profile", "gcm"),
    [(GCM256, False), (GCM256, True), (CM80, False)],
    ids=["aes-gcm-libsrtp", "aes-gcm-native", "aes-cm"],
)
def test_every_listener_decrypts_the_shared_packet(
    sender: socket.socket, profile: tuple[int, int], gcm: bool, native: bool
) -> None:
    listeners = [Listener(profile, gcm=gcm) for _ in range(21)]
    protect = listeners[0].handle(sender.fileno()).protect_address
    # grows twice, 3 chunks
    plan = ShardPlan(sender.fileno(), chunk=8, capacity=4, native=native, protect_address=protect)
    for listener in listeners:
        plan.add(listener.handle(sender.fileno()))
    assert len(plan) == 21 and plan.capacity == 32
    observed = FORWARD_LATENCY.count()
    for seq in range(3):
        packet = build_header(0, 111, 100 + seq, 960 * seq, 0x42) + bytes([seq]) * 60
        sent, nbytes = plan.fanout(packet, received=0.0)
        assert sent == 21 and nbytes > 21 * len(packet)
        for listener in listeners:
            assert listener.receive() == packet
    assert FORWARD_LATENCY.count() == observed + 63, "one observation per listener-packet"


def test_removing_listeners_keeps_the_others(sender: socket.socket, native: bool) -> None:
    listeners = [Listener() for _ in range(5)]
    handles = [listener.handle(sender.fileno()) for listener in listeners]
    plan = ShardPlan(sender.fileno(), chunk=2, native=native)
    for handle in handles:
        plan.add(handle)
    plan.add(handles[0])  # twice: no-op
    plan.remove(handles[1])
    plan.remove(handles[4])
    plan.remove(handles[4])  # absent: no-op
    packet = build_header(0, 111, 1, 0, 7) + b"x" * 30
    assert plan.fanout(packet, 0.0)[0] == 3
    for i in (0, 2, 3):
        assert listeners[i].receive() == packet
    assert listeners[1].received_nothing() and listeners[4].received_nothing()


def test_oversized_packets_are_dropped(sender: socket.socket, native: bool) -> None:
    listener = Listener()
    plan = ShardPlan(sender.fileno(), chunk=4, native=native)
    plan.add(listener.handle(sender.fileno()))
    before = (
        REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "too_large"})
        or 0
    )
    assert plan.fanout(b"\x80\x6f" + b"\0" * MAX_PLAINTEXT, 0.0) == (0, 0)
    after = REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "too_large"})
    assert after == before + 1
    empty = ShardPlan(sender.fileno(), 4, native=native)
    assert empty.fanout(b"\x80", 0.0) == (0, 0), "no listeners"


def test_a_plan_takes_only_listeners_of_its_protect_function(sender: socket.socket) -> None:
    plan = ShardPlan(sender.fileno(), chunk=4)
    with pytest.raises(ValueError, match="protect function"):
        plan.add(Listener(gcm=True).handle(sender.fileno()))


def test_native_aes_gcm_never_protects_an_index_twice(sender: socket.socket, native: bool) -> None:
    listener = Listener(gcm=True)
    handle = listener.handle(sender.fileno())
    plan = ShardPlan(
        sender.fileno(), chunk=4, native=native, protect_address=handle.protect_address
    )
    plan.add(handle)
    packet = build_header(0, 111, 1, 0, 7) + b"y" * 30
    assert plan.fanout(packet, 0.0)[0] == 1 and listener.receive() == packet
    failures = (
        REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"}) or 0
    )
    assert plan.fanout(packet, 0.0)[0] == 0, "a repeated index would reuse a GCM nonce"
    assert listener.received_nothing()
    assert (
        REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"})
        == failures + 1
    )


def test_a_failed_protection_skips_only_that_listener(sender: socket.socket, native: bool) -> None:
    # Without allow_repeat_tx, libsrtp refuses to protect the same packet twice.
    first, strict, last = Listener(), Listener(repeat_tx=False), Listener()
    plan = ShardPlan(sender.fileno(), chunk=4, native=native)
    for listener in (first, strict, last):
        plan.add(listener.handle(sender.fileno()))
    packet = build_header(0, 111, 1, 0, 7) + b"y" * 30
    assert plan.fanout(packet, 0.0)[0] == 3
    assert all(listener.receive() == packet for listener in (first, strict, last))
    failures = (
        REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"}) or 0
    )
    sent, _ = plan.fanout(packet, 0.0)  # the same packet again (a receiver would drop it)
    assert sent == 2
    assert first.sock.recv(2048) and last.sock.recv(2048)
    assert strict.received_nothing()
    assert (
        REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"})
        == failures + 1
    )


@pytest.mark.parametrize("gcm", [False, True], ids=["libsrtp", "native-aes-gcm"])
@pytest.mark.parametrize("count", [3, 9, 21, 24])
def test_a_split_fanout_reaches_every_listener_once_in_order(
    sender: socket.socket, gcm: bool, count: int
) -> None:
    # 3 helpers: up to 4 runs of whole chunks of 4 (no more than CPUs or chunks); one
    # listener that refuses repeats sits in the last run, on a helper's thread.
    helpers = FanoutHelpers(3)
    try:
        assert len(helpers) == 3
        assert helpers.parts == min(4, len(os.sched_getaffinity(0)))
        listeners = [Listener(gcm=gcm) for _ in range(count - 1)]
        strict = Listener(repeat_tx=False)
        protect = listeners[0].handle(sender.fileno()).protect_address
        plan = ShardPlan(sender.fileno(), chunk=4, protect_address=protect, helpers=helpers)
        for listener in listeners:
            plan.add(listener.handle(sender.fileno()))
        if not gcm:
            plan.add(strict.handle(sender.fileno()))
            listeners.append(strict)
        expected = len(listeners)
        observed = FORWARD_LATENCY.count()
        packets = [
            build_header(0, 111, 500 + seq, 960 * seq, 0x42) + bytes([seq]) * (40 + seq)
            for seq in range(4)
        ]
        for packet in packets:
            sent, nbytes = plan.fanout(packet, received=0.0)
            assert sent == expected and nbytes > expected * len(packet)
        for listener in listeners:
            assert [listener.receive() for _ in packets] == packets
            assert listener.received_nothing(), "each packet once"
        assert FORWARD_LATENCY.count() == observed + expected * len(packets)
        if not gcm:
            failures = (
                REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"})
                or 0
            )
            assert plan.fanout(packets[-1], 0.0)[0] == expected - 1
            assert strict.received_nothing()
            assert (
                REGISTRY.get_sample_value("spaces_media_packets_dropped_total", {"reason": "srtp"})
                == failures + 1
            )
    finally:
        helpers.close()
        helpers.close()  # twice: no-op


async def test_a_pool_with_split_fanouts_forwards_and_closes(sender: socket.socket) -> None:
    pool = EgressPool(threads=1, chunk=2, split=3)
    listeners = [Listener(gcm=True) for _ in range(7)]
    handles = [listener.handle(sender.fileno()) for listener in listeners]
    try:
        assert pool.workers[0].helpers is not None and len(pool.workers[0].helpers) == 2
        for handle in handles:
            pool.attach(handle)
            pool.join(1, handle)
        packet = build_header(0, 111, 1, 0, 9) + b"s" * 20
        pool.fanout(1, packet, 0.0)
        await pool.flush()
        assert all(listener.receive() == packet for listener in listeners)
    finally:
        pool.close()
    assert pool.workers[0].helpers is None, "closing the pool stops the helper threads"


@pytest.mark.parametrize("threads", [0, 2])
async def test_the_pool_serves_groups_rtcp_and_flushes(sender: socket.socket, threads: int) -> None:
    pool = EgressPool(threads=threads, chunk=4)
    # Both protect functions in one group: the worker keeps a plan for each.
    listeners = [Listener(gcm=i % 2 == 1) for i in range(6)]
    handles = [listener.handle(sender.fileno()) for listener in listeners]
    try:
        for handle in handles:
            pool.attach(handle)
        assert sorted(w.load for w in pool.workers) == ([3, 3] if threads == 2 else [6])
        for handle in handles[:4]:
            pool.join(1, handle)
        for handle in handles[4:]:
            pool.join(2, handle)
        before = sent_total()
        packet = build_header(0, 111, 1, 0, 9) + b"z" * 20
        pool.fanout(1, packet, 0.0)
        pool.fanout(3, packet, 0.0)  # nobody: nothing happens
        await pool.flush()
        assert sent_total() == before + 4
        for listener in listeners[:4]:
            assert listener.receive() == packet
        assert all(listener.received_nothing() for listener in listeners[4:])

        pool.leave(1, handles[0])
        pool.fanout(1, packet, 0.0)
        rtcp = b"\x80\xc9\x00\x01\x00\x00\x00\x01"  # an empty RR
        pool.send_rtcp(handles[5], rtcp)
        await pool.flush()
        assert listeners[0].received_nothing()
        assert listeners[5].rx.unprotect_rtcp(listeners[5].sock.recv(2048)) == rtcp
        assert sum(w.listeners() for w in pool.workers) == 5
        for handle in handles:
            pool.detach(handle)
        assert all(w.load == 0 for w in pool.workers)
    finally:
        pool.close()


async def test_flush_returns_with_idle_threaded_workers() -> None:
    pool = EgressPool(threads=2, chunk=4)
    try:
        await asyncio.wait_for(pool.flush(), 2)
    finally:
        pool.close()


async def test_workers_and_helpers_send_on_their_own_sockets_from_the_mux_port() -> None:
    mux = IceMux("127.0.0.1")
    await mux.start()
    pool = EgressPool(threads=1, chunk=2, split=2, send_sockets=mux.send_sockets)
    listeners = [Listener(gcm=True) for _ in range(6)]
    try:
        worker = pool.workers[0]
        assert worker.send_fd is not None and worker.send_fd != mux.fd
        assert len(mux._send_socks) == 2, "one for the worker, one for its helper"
        for listener in listeners:
            handle = listener.handle(mux.fd)
            pool.attach(handle)
            pool.join(1, handle)
        packet = build_header(0, 111, 1, 0, 9) + b"p" * 20
        pool.fanout(1, packet, 0.0)
        await pool.flush()
        for listener in listeners:  # three on the worker's socket, three on the helper's
            data, source = listener.sock.recvfrom(2048)
            assert listener.rx.unprotect(data) == packet
            assert source == ("127.0.0.1", mux.port)
    finally:
        pool.close()
        mux.close()

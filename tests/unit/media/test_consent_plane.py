"""The consent plane (``native/consent_plane.c``): STUN on the ICE port is steered to its
thread, which answers exactly the checks the event loop would answer, takes exactly the
answers the checker expects, and hands everything else to the event loop unchanged.

Real sockets on loopback and real aioice connections; the answers are compared byte for
byte with the Python reference (:func:`services.media.consent.binding_success`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aioice.ice
import pytest
from aioice import stun
from aioice.ice import Connection
from prometheus_client import REGISTRY

from services.media import aiortc_internals as internals
from services.media.consent import ICE_CONTROLLED, CheckParams, ConsentTarget, binding_success
from services.media.consent_plane import ConsentPlane, PlaneChecker
from services.media.icemux import IceMux, MuxedStunProtocol
from tests.helpers.ice import loopback_ice  # noqa: F401  (an autouse fixture)
from tests.unit.media.test_consent import LOCAL_PWD, REMOTE_PWD, aioice_request
from tests.unit.media.test_icemux import receive

Address = tuple[str, int]


class Forwarded:
    """Records what the plane hands to the event loop (in place of the mux's dispatch)."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Address]] = []

    def __call__(self, data: bytes, address: Address) -> None:
        self.datagrams.append((data, address))


@pytest.fixture
def plane(mux: IceMux) -> ConsentPlane:
    assert mux.plane is not None, "the native module is built and the kernel steers STUN"
    return mux.plane


@pytest.fixture
def forwarded(plane: ConsentPlane) -> Forwarded:
    recorder = Forwarded()
    plane._dispatch = recorder
    return recorder


def response(tid: bytes, password: bytes | None, success: bool = True) -> bytes:
    message = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE if success else stun.Class.ERROR,
        transaction_id=tid,
    )
    if success:
        message.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.1", 5000)
    else:
        message.attributes["ERROR-CODE"] = (401, "Unauthenticated")
    if password is not None:
        message.add_message_integrity(password)
    message.add_fingerprint()
    return bytes(message)


async def settled(plane: ConsentPlane, key: str, count: int) -> dict[str, int]:
    """The plane's counters once ``key`` reached ``count`` (or after a second)."""
    for _ in range(100):
        stats = plane.stats()
        if stats[key] >= count:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)  # the loop's reader runs for what was forwarded
    return plane.stats()


async def test_stun_reaches_the_plane_and_media_the_mux_from_every_source_port(
    mux: IceMux, plane: ConsentPlane, forwarded: Forwarded, clients: list[socket.socket]
) -> None:
    on_mux: list[bytes] = []
    mux.dispatch = lambda data, address, received=0.0: on_mux.append(data)  # type: ignore[method-assign]
    for i, sock in enumerate(clients):
        sock.sendto(b"\x00\x01stun" + bytes([i]), ("127.0.0.1", mux.port))
        sock.sendto(b"\x80\x6fsrtp" + bytes([i]), ("127.0.0.1", mux.port))
        sock.sendto(b"\x16dtls" + bytes([i]), ("127.0.0.1", mux.port))
    stats = await settled(plane, "forwarded", 40)
    assert stats["forwarded"] == 40 and stats["answered"] == stats["verified"] == 0
    assert sorted(forwarded.datagrams) == sorted(
        (b"\x00\x01stun" + bytes([i]), sock.getsockname()) for i, sock in enumerate(clients)
    ), "every STUN datagram, with its source address, and nothing else"
    assert sorted(on_mux) == sorted(
        [b"\x80\x6fsrtp" + bytes([i]) for i in range(40)]
        + [b"\x16dtls" + bytes([i]) for i in range(40)]
    )


async def test_a_consent_check_is_answered_on_the_thread_as_python_answers_it(
    mux: IceMux, plane: ConsentPlane, forwarded: Forwarded, client: socket.socket
) -> None:
    address = client.getsockname()
    assert plane.answer_for(address, "lufrag", LOCAL_PWD, ICE_CONTROLLED)
    check = aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLING": 7})
    client.sendto(check, ("127.0.0.1", mux.port))
    answer = await receive(client)
    assert answer == binding_success(check[8:20], address, LOCAL_PWD), "the reference's bytes"
    message = stun.parse_message(answer)
    assert message.attributes["XOR-MAPPED-ADDRESS"] == address
    assert message.check_message_integrity(LOCAL_PWD)
    stats = await settled(plane, "answered", 1)
    assert stats["answered"] == 1 and stats["forwarded"] == 0 and not forwarded.datagrams


@pytest.mark.parametrize(
    "name,check",
    [
        ("nomination", aioice_request("lufrag:rufrag", LOCAL_PWD, **{"USE-CANDIDATE": None})),
        ("role conflict", aioice_request("lufrag:rufrag", LOCAL_PWD, **{"ICE-CONTROLLED": 7})),
        ("wrong password", aioice_request("lufrag:rufrag", b"w" * 22)),
        ("other session", aioice_request("other:rufrag", LOCAL_PWD)),
        ("ufrag prefix only", aioice_request("lufragX:rufrag", LOCAL_PWD)),
        ("no integrity", bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))),
        ("truncated", aioice_request("lufrag:rufrag", LOCAL_PWD)[:-9]),
    ],
)
async def test_anything_else_goes_to_the_event_loop_unanswered(
    mux: IceMux,
    plane: ConsentPlane,
    forwarded: Forwarded,
    client: socket.socket,
    name: str,
    check: bytes,
) -> None:
    plane.answer_for(client.getsockname(), "lufrag", LOCAL_PWD, ICE_CONTROLLED)
    client.sendto(check, ("127.0.0.1", mux.port))
    stats = await settled(plane, "forwarded", 1)
    assert stats["answered"] == 0 and stats["forwarded"] == 1, name
    assert forwarded.datagrams == [(check, client.getsockname())]
    assert await receive(client, timeout=0.05) is None


async def test_checks_from_other_addresses_or_after_forget_are_not_answered(
    mux: IceMux, plane: ConsentPlane, forwarded: Forwarded, client: socket.socket
) -> None:
    check = aioice_request("lufrag:rufrag", LOCAL_PWD)
    plane.answer_for(("127.0.0.1", client.getsockname()[1] ^ 1), "lufrag", LOCAL_PWD, 0)
    client.sendto(check, ("127.0.0.1", mux.port))
    await settled(plane, "forwarded", 1)
    plane.answer_for(client.getsockname(), "lufrag", LOCAL_PWD, 0)
    client.sendto(check, ("127.0.0.1", mux.port))
    assert await receive(client) is not None
    plane.forget(client.getsockname())
    client.sendto(check, ("127.0.0.1", mux.port))
    stats = await settled(plane, "forwarded", 2)
    assert stats["answered"] == 1 and stats["forwarded"] == 2
    assert [data for data, _ in forwarded.datagrams] == [check, check]


class Peer:
    """A peer on its own socket that answers the node's consent checks (or not)."""

    def __init__(self, password: bytes = REMOTE_PWD, delay: float = 0.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address: Address = self.sock.getsockname()
        self.password = password
        self.accepted = [password]
        """Passwords a check may be signed with; the answer is signed with the same one."""
        self.delay = delay
        self.answering = True
        self.refusing = False
        self.forging = False
        self.checks: list[stun.Message] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, source = await loop.sock_recvfrom(self.sock, 2048)
            request = stun.parse_message(data)
            self.checks.append(request)
            if not self.answering:
                continue
            tid = request.transaction_id
            key = next(k for k in self.accepted if request.check_message_integrity(k))
            if self.refusing:
                reply = response(tid, None, success=False)
            else:
                reply = response(tid, b"forged-password-012345" if self.forging else key)
            if self.delay:
                loop.call_later(self.delay, self.sock.sendto, reply, source)
            else:
                self.sock.sendto(reply, source)

    def params(self, username: str = "r:l") -> CheckParams:
        return CheckParams(username, 1234, 99, False, self.password, self.address)

    def close(self) -> None:
        self._task.cancel()
        self.sock.close()


@pytest.fixture
async def standalone() -> AsyncIterator[ConsentPlane]:
    """A plane on a socket of its own, checking every 0.05 s, 3 misses to expire."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    plane = ConsentPlane(sock, Forwarded(), interval=0.05, failures=3)
    plane.start()
    yield plane
    plane.close()


class Outcomes:
    """What a checker reported for its targets."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.expired_at: dict[str, float] = {}

    def target(self, name: str, check: Callable[[], CheckParams | None]) -> ConsentTarget:
        def expired() -> None:
            self.log.append((name, "expired"))
            self.expired_at[name] = time.monotonic()

        return ConsentTarget(
            check=check,
            send=lambda data, address: None,
            expired=expired,
            on_answer=lambda address: self.log.append((name, f"answer {address[1]}")),
            on_miss=lambda address: self.log.append((name, f"miss {address[1]}")),
        )

    def of(self, name: str) -> list[str]:
        return [what for who, what in self.log if who == name]


async def test_the_thread_keeps_an_answering_peer_and_expires_a_silent_one(
    standalone: ConsentPlane,
) -> None:
    checker = PlaneChecker(standalone)
    live, silent = Peer(), Peer()
    silent.answering = False
    outcomes = Outcomes()
    try:
        live_target = outcomes.target("live", live.params)
        checker.track(live_target)
        checker.track(outcomes.target("silent", silent.params))
        await asyncio.sleep(0.5)
        assert outcomes.of("silent")[-1] == "expired" and "expired" not in outcomes.of("live")
        assert outcomes.of("silent").count(f"miss {silent.address[1]}") == 3
        assert live_target.active and len(checker) == 1 and standalone.tracked() == 1
        # What went out is what aioice sends, signed with the remote password.
        check = live.checks[-1]
        assert check.attributes["USERNAME"] == "r:l" and check.attributes["PRIORITY"] == 1234
        assert check.attributes["ICE-CONTROLLED"] == 99
        assert check.check_message_integrity(REMOTE_PWD)
        assert len({c.transaction_id for c in live.checks}) == len(live.checks), "fresh ids"
        stats = standalone.stats()
        assert stats["verified"] >= 5 and stats["expired"] == 1 and stats["missed"] == 3

        live.answering = False
        await asyncio.sleep(0.5)
        assert outcomes.of("live")[-1] == "expired" and len(checker) == 0
        assert standalone.tracked() == 0, "the thread untracks what it expired"
    finally:
        live.close()
        silent.close()


async def test_on_the_thread_consent_runs_out_within_the_timeout_of_the_last_answer(
    standalone: ConsentPlane,
) -> None:
    """As :class:`ConsentChecker`: 40 silent peers all expire within the timeout (three
    misses take at least 2.4 intervals, the timeout is 3.6), and a session with nothing to
    check never does: its clock stands still."""
    checker = PlaneChecker(standalone)
    peers = [Peer() for _ in range(40)]
    outcomes = Outcomes()
    try:
        for peer in peers:
            peer.answering = False
        started = time.monotonic()
        for i, peer in enumerate(peers):
            checker.track(outcomes.target(f"silent {i}", peer.params))
        idle = outcomes.target("idle", lambda: None)
        checker.track(idle)
        await asyncio.sleep(0.6)
        assert len(outcomes.expired_at) == 40 and "idle" not in outcomes.expired_at
        assert max(outcomes.expired_at.values()) - started <= checker.timeout + 0.05
        assert idle.active and len(checker) == 1
        assert standalone.tracked() == 0, "the thread learns of it once there is a check"
    finally:
        for peer in peers:
            peer.close()


async def test_a_recovery_an_error_answer_and_a_forged_answer_on_the_thread(
    standalone: ConsentPlane,
) -> None:
    checker = PlaneChecker(standalone)
    peer = Peer()
    outcomes = Outcomes()
    try:
        target = outcomes.target("peer", peer.params)
        checker.track(target)
        await asyncio.sleep(0.2)
        assert outcomes.of("peer") == [], "answered: nothing to report"
        peer.answering = False
        await asyncio.sleep(0.08)  # one or two checks left unanswered
        peer.answering = True
        await asyncio.sleep(0.2)
        port = peer.address[1]
        log = outcomes.of("peer")
        assert log and set(log[:-1]) == {f"miss {port}"} and log[-1] == f"answer {port}"
        assert target.failures == 0

        # A forged success is as if lost; an unsigned 401 refuses consent at once.
        outcomes.log.clear()
        dropped = standalone.stats()["dropped"]
        peer.forging = True
        await asyncio.sleep(0.1)
        assert standalone.stats()["dropped"] > dropped
        assert f"miss {port}" in outcomes.of("peer")
        peer.forging, peer.refusing = False, True
        await asyncio.sleep(0.3)
        assert outcomes.of("peer")[-1] == "expired"
    finally:
        peer.close()


async def test_refreshed_parameters_apply_from_the_next_check(standalone: ConsentPlane) -> None:
    checker = PlaneChecker(standalone)
    old, new = Peer(), Peer()
    where = {"peer": old}
    outcomes = Outcomes()
    try:
        target = outcomes.target("moving", lambda: where["peer"].params("r2:l2"))
        checker.track(target)
        await asyncio.sleep(0.2)
        assert old.checks and not new.checks
        where["peer"] = new
        checker.refresh(target)
        sent_before = len(old.checks)
        await asyncio.sleep(0.2)
        assert len(old.checks) <= sent_before + 1, "at most one already under way"
        assert new.checks and new.checks[-1].attributes["USERNAME"] == "r2:l2"
        assert "expired" not in outcomes.of("moving")
        checker.untrack(target)
        assert standalone.tracked() == 0 and not target.active
    finally:
        old.close()
        new.close()


async def test_an_answer_is_checked_with_the_key_its_check_was_signed_with(
    standalone: ConsentPlane,
) -> None:
    """An ICE restart changes the remote password while a check is under way: its answer,
    signed with the old password, still counts (as in :class:`ConsentChecker`)."""
    checker = PlaneChecker(standalone)
    passwords = [b"first-remote-password-0", b"second-remote-password-0"]
    peer = Peer(passwords[0], delay=0.03)  # a check is under way most of the time
    peer.accepted = passwords
    current = {"password": passwords[0]}
    outcomes = Outcomes()
    try:
        target = outcomes.target(
            "restarting",
            lambda: CheckParams("r:l", 1, 2, False, current["password"], peer.address),
        )
        checker.track(target)
        await asyncio.sleep(0.15)
        for round_ in range(12):
            current["password"] = passwords[(round_ + 1) % 2]
            checker.refresh(target)
            await asyncio.sleep(0.07)
        assert outcomes.of("restarting") == [], "no answer taken for a forgery"
        assert standalone.stats()["dropped"] == 0
        assert len(peer.checks) >= 15
    finally:
        peer.close()


async def test_exported_counters_add_up_every_planes_work(standalone: ConsentPlane) -> None:
    outcomes = ("checked", "verified", "missed", "expired")

    def exported() -> dict[str, float]:
        return {
            outcome: REGISTRY.get_sample_value(
                "spaces_media_consent_messages_total", {"outcome": outcome}
            )
            or 0.0
            for outcome in outcomes
        }

    before = exported()
    checker = PlaneChecker(standalone)
    peer = Peer()
    try:
        target = Outcomes().target("peer", peer.params)
        checker.track(target)
        await asyncio.sleep(0.2)
        peer.answering = False
        await asyncio.sleep(0.3)
        assert not target.active
        during = exported()
        assert all(during[outcome] > before[outcome] for outcome in outcomes), (before, during)
        standalone.close()
        assert exported() == during, "a closed plane's work stays counted"
    finally:
        peer.close()


async def test_ipv6_sources_are_answered_and_forwarded_with_their_address() -> None:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback (::1)")
    mux = IceMux("::1")
    await mux.start()
    try:
        assert mux.plane is not None
        recorder = Forwarded()
        mux.plane._dispatch = recorder
        probe.setblocking(False)
        address = probe.getsockname()[:2]
        mux.plane.answer_for(address, "lufrag", LOCAL_PWD, 0)
        check = aioice_request("lufrag:rufrag", LOCAL_PWD)
        probe.sendto(check, ("::1", mux.port))
        assert await receive(probe) == binding_success(check[8:20], address, LOCAL_PWD)
        probe.sendto(b"\x01\x01" + os.urandom(30), ("::1", mux.port))
        await settled(mux.plane, "forwarded", 1)
        assert recorder.datagrams[0][1] == address
    finally:
        probe.close()
        mux.close()


@pytest.fixture
def short_consent() -> Iterator[None]:
    saved = internals.consent_interval()
    internals.set_consent_interval(0.3)
    yield
    internals.set_consent_interval(saved)


async def connected_pair(mux: IceMux) -> tuple[Connection, Connection]:
    """An aioice app (its own sockets, controlling) connected to a session on the mux."""
    server = Connection(ice_controlling=False)
    mux.attach(server)
    app = Connection(ice_controlling=True, components=1)
    await asyncio.gather(server.gather_candidates(), app.gather_candidates())
    app.remote_username, app.remote_password = server.local_username, server.local_password
    server.remote_username, server.remote_password = app.local_username, app.local_password
    for candidate in server.local_candidates:
        await app.add_remote_candidate(candidate)
    await app.add_remote_candidate(None)
    for candidate in app.local_candidates:
        await server.add_remote_candidate(candidate)
    await server.add_remote_candidate(None)
    await asyncio.wait_for(asyncio.gather(app.connect(), server.connect()), 10.0)
    return app, server


async def test_a_connected_sessions_consent_is_kept_on_the_thread(short_consent: None) -> None:
    """End to end with aioice: the app's consent checks are answered and the node's own
    checks verified on the thread; the event loop sees no consent traffic; when the app
    vanishes, the session's consent still runs out."""
    mux = IceMux("127.0.0.1")
    await mux.start()
    app: Connection | None = None
    try:
        plane = mux.plane
        assert plane is not None and mux.consent is not None
        app, server = await connected_pair(mux)
        protocol = server._protocols[0]
        assert isinstance(protocol, MuxedStunProtocol)
        for _ in range(100):
            if protocol.answering is not None:
                break
            await asyncio.sleep(0.02)
        assert protocol.answering == (
            protocol.remote_address,
            server.local_username,
            server.local_password,
        )
        start = plane.stats()
        loop_answers: list[bytes] = []
        original = mux._answer_consent

        def on_loop(protocol: MuxedStunProtocol, data: bytes, address: Address) -> bool:
            loop_answers.append(data)
            return original(protocol, data, address)

        mux._answer_consent = on_loop  # type: ignore[method-assign]
        await asyncio.sleep(2.0)
        stats = plane.stats()
        # ~0.3 s between checks each way: 2 s is several of each.
        assert stats["answered"] - start["answered"] >= 3, stats
        assert stats["verified"] - start["verified"] >= 3, stats
        assert loop_answers == [], "no consent check reached the event loop"
        assert server._query_consent_task is not None
        assert not server._query_consent_task.done(), "consent kept"

        # The app vanishes without a word: the node's checks go unanswered.
        if app._query_consent_task is not None:
            app._query_consent_task.cancel()  # the app's own checks stop with its socket
        for pair in app._nominated.values():
            pair.protocol.transport.close()
        vanished = time.monotonic()
        timeout = mux.consent.timeout
        await asyncio.wait_for(server._query_consent_task, timeout + 2.0)
        took = time.monotonic() - vanished
        assert took <= timeout + 0.5, f"expired after {took:.2f} s (timeout {timeout:.2f} s)"
        assert protocol.answering is None, "the thread stops answering for the session"
    finally:
        if app is not None:
            await app.close()
        mux.close()
    assert aioice.ice.CONSENT_INTERVAL == 0.3


async def test_without_the_plane_the_event_loop_keeps_consent(short_consent: None) -> None:
    mux = IceMux("127.0.0.1", consent_plane=False)
    await mux.start()
    app: Connection | None = None
    try:
        assert mux.plane is None
        answered: list[bytes] = []
        original = mux._answer_consent

        def on_loop(protocol: MuxedStunProtocol, data: bytes, address: Address) -> bool:
            result = original(protocol, data, address)
            if result:
                answered.append(data)
            return result

        mux._answer_consent = on_loop  # type: ignore[method-assign]
        app, server = await connected_pair(mux)
        await asyncio.sleep(1.5)
        assert len(answered) >= 2
        assert server._query_consent_task is not None
        assert not server._query_consent_task.done()
    finally:
        if app is not None:
            await app.close()
        mux.close()

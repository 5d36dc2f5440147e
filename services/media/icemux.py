"""One UDP socket for every ICE session of the node (an "ICE mux", as pion's UDPMux).

aioice opens sockets of its own for every connection; an SFU with a thousand listeners
would then have a thousand sockets and could not batch sends across listeners. Instead,
each session's aioice :class:`~aioice.ice.Connection` gets a single host candidate whose
protocol (:class:`MuxedStunProtocol`) sends through the shared socket. Incoming datagrams
are demultiplexed by source address; an address is learned from the first STUN binding
request that carries a session's username fragment and passes its message integrity.

Demultiplexed traffic goes where aioice would have sent it: STUN to the session's
protocol, DTLS to its connection's receive queue (and on to aiortc). SRTP/SRTCP goes to
the session's ``srtp_handler`` once it has one (after DTLS), skipping aioice's queue and
aiortc's DTLS task.

The shared socket is also one port to open in a firewall or a Kubernetes Service.

**Consent** (RFC 7675) of connected sessions is kept by the mux, not by aioice's
per-connection task and generic STUN code (a tenth of a core for a thousand listeners):
the consent plane's native thread (:mod:`services.media.consent_plane`, which a BPF
program on the port hands every STUN datagram) sends every session's checks and answers a
peer's plain consent check from the session's current address; without the native module,
one :class:`~services.media.consent.ConsentChecker` and :meth:`IceMux._answer_consent` do
the same on the event loop. Any other STUN (nominations, role conflicts, other addresses,
checks during a restart) still goes through aioice. A session whose nominated pair is not
on the mux (TURN) keeps aioice's own consent task.

**Moving a session** (ICE restart, NAT rebinding). aioice itself replaces a connection's
nominated pair whenever the app nominates another one (``USE-CANDIDATE`` on a pair whose
check succeeded), also long after ICE completed. The mux watches for that (after every STUN
datagram and every STUN transaction of the session) and moves the session there: the
addresses learned before are forgotten, so the old path is no longer used, and the
session's ``on_moved`` callback moves its egress. :meth:`IceMux.restart` gives a connection
new credentials for an ICE restart (RFC 8445 section 9); the DTLS association and SRTP
contexts are untouched, as a browser's ``pc.restartIce()`` expects.

A plain NAT rebinding (the app's packets suddenly come from another port, with the same
credentials, and nobody nominates anything) is followed too, but only once the current
address has stopped answering consent checks and the new one has passed a check of its
own within :data:`REBIND_WINDOW_S`: an app that merely checks a backup path (browsers keep
pinging theirs) does not move the session while its selected path works.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import socket
import string
import struct
import time
from collections.abc import Callable
from typing import Any

from aioice import stun
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import (
    CandidatePair,
    Connection,
    StunProtocol,
    validate_password,
    validate_username,
)

from services.media import aiortc_internals as internals
from services.media.consent import (
    BINDING_ERROR,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    ICE_CONTROLLED,
    ICE_CONTROLLING,
    CheckParams,
    ConsentChecker,
    ConsentTarget,
    binding_success,
    parse_binding_request,
)
from services.media.consent_plane import ConsentPlane, PlaneChecker

logger = logging.getLogger(__name__)

__all__ = ["REBIND_WINDOW_S", "IceMux", "MuxedStunProtocol"]

_UFRAG_ALPHABET = string.ascii_letters + string.digits
_PASSWORD_LENGTH = 24
REBIND_WINDOW_S = 30.0
"""How recently another address of a session must have passed a check for the session
to follow it when its current address stops answering consent checks."""
_MAX_ADDRESSES = 8
_SOCKET_BUFFER = 4 << 20
_READ_BUDGET = 256
"""Datagrams read per wake-up before other callbacks get a turn."""
_MAX_DATAGRAM = 4096
_SO_TIMESTAMPNS = 35  # Linux; SCM_TIMESTAMPNS has the same value
_SO_ATTACH_REUSEPORT_CBPF = 51  # Linux
# Classic BPF programs choosing the socket of the port's reuseport group (the program sees
# the UDP payload). "return 0": every datagram to the first socket (the mux's), never to
# the send sockets that joined later.
_FIRST_SOCKET_PROGRAM = struct.pack("HBBI", 0x06, 0, 0, 0)
# "A = first byte; if A >= 2 return 0 else return 1": STUN (first byte 0 or 1, RFC 7983)
# to the second socket (the consent plane's), everything else to the mux's.
_STUN_TO_SECOND_PROGRAM = b"".join(
    (
        struct.pack("HBBI", 0x30, 0, 0, 0),  # ldb [0]
        struct.pack("HBBI", 0x35, 1, 0, 2),  # jge #2, +1
        struct.pack("HBBI", 0x06, 0, 0, 1),  # ret #1
        struct.pack("HBBI", 0x06, 0, 0, 0),  # ret #0
    )
)
_SCM_TIMESTAMPNS = _SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("=qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)

SrtpHandler = Callable[[bytes, float], None]

MUX_CONSENT_FAILURES = 5
"""Unanswered consent checks in a row after which the mux expires a session's consent."""
Address = tuple[str, int]


class MuxedStunProtocol(StunProtocol):
    """aioice's per-candidate protocol, sending through the mux's shared socket.

    :param connection: the aioice connection it belongs to.
    :param mux: the mux that owns the socket.
    :param candidate: the host candidate it stands for.
    """

    def __init__(self, connection: Connection, mux: IceMux, candidate: Candidate) -> None:
        super().__init__(connection)
        self.mux = mux
        self.local_candidate = candidate
        self.srtp_handler: SrtpHandler | None = None
        self.addresses: set[Address] = set()
        self.remote_address: Address | None = None
        """Where the session's traffic goes: the remote address of its nominated pair."""
        self.on_moved: Callable[[Address], None] | None = None
        """Called with the new address when the nominated pair moved to another one."""
        self.consent_misses = 0
        """Consecutive unanswered checks of :attr:`remote_address`."""
        self.checked: dict[Address, float] = {}
        """When a check of ours to each address last succeeded (``time.monotonic()``)."""
        self.consent: ConsentTarget | None = None
        """The session's consent, while the mux keeps it (connected, pair on the mux)."""
        self.answering: tuple[Address, str, str] | None = None
        """What the consent plane answers checks for: (address, local ufrag, password)."""
        transport = mux.transport
        assert transport is not None, "start() the mux first"
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """The shared socket closed (the mux is stopping)."""
        self.receiver.protocol_lost(self)

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        """aioice's handling, then a look at the nominated pair: a ``USE-CANDIDATE``
        check on a pair that already succeeded nominates it synchronously."""
        super().datagram_received(data, addr)
        self.mux.follow(self)

    async def request(
        self,
        request: stun.Message,
        addr: Address,
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, Address]:
        """aioice's STUN transaction, noting which addresses answer.

        aioice's check nominates a pair right after this returns, in the same task step;
        a callback scheduled here runs after that step, so it sees the outcome.
        """
        try:
            result = await super().request(request, addr, integrity_key, retransmissions)
        except stun.TransactionError:
            if addr == self.remote_address:
                self.consent_misses += 1
            raise
        else:
            self.checked[addr] = time.monotonic()
            if addr == self.remote_address:
                self.consent_misses = 0
            return result
        finally:
            asyncio.get_running_loop().call_soon(self.mux.follow, self)

    async def close(self) -> None:
        """Leave the mux; the shared socket stays open for the other sessions."""
        self.mux.unregister(self)


class _MuxTransport(asyncio.DatagramTransport):
    """What aioice's protocols send through: the shared socket, never closed by them."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            logger.debug("ICE mux socket full, dropping a datagram to %s", addr)
        except OSError as exc:
            logger.debug("ICE mux send to %s failed: %s", addr, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Sessions do not close the shared socket (see :meth:`IceMux.close`)."""

    def abort(self) -> None:
        """Sessions do not close the shared socket (see :meth:`IceMux.close`)."""


class IceMux:
    """The shared ICE socket and the table of sessions on it.

    :param host: the address to bind (and to announce, unless ``announce`` is given).
    :param port: the UDP port; 0 picks a free one.
    :param announce: the address written into candidates (e.g. a node's public IP).
    :param consent_plane: keep connected sessions' consent on a native thread
        (:class:`~services.media.consent_plane.ConsentPlane`) when the native module is
        built and the kernel steers STUN to it; else on the event loop.
    """

    def __init__(
        self, host: str, port: int = 0, announce: str | None = None, consent_plane: bool = True
    ) -> None:
        self.host = host
        self.port = port
        self.announce = announce or host
        self.transport: asyncio.DatagramTransport | None = None
        self.fd = -1
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timestamps = False
        self._reuseport = False
        self._send_socks: list[socket.socket] = []
        self._by_address: dict[tuple[str, int], MuxedStunProtocol] = {}
        self._by_ufrag: dict[str, MuxedStunProtocol] = {}
        self._protocols: set[MuxedStunProtocol] = set()
        self.consent: ConsentChecker | PlaneChecker | None = None
        self._want_plane = consent_plane
        self.plane: ConsentPlane | None = None
        """The consent plane, when it runs."""

    async def start(self) -> None:
        """Bind the socket and start reading it.

        The socket is read with a reader of the mux's own rather than an asyncio
        datagram transport, which takes one datagram per event-loop iteration: all the
        node's ICE, DTLS, RTCP and publisher traffic arrives here, and under a burst of
        joins one datagram per iteration falls behind until ICE consent checks time out.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        self._reuseport = _join_reuseport(sock)
        if self._reuseport:
            # Fail loudly when another process holds the port (SO_REUSEPORT would let a
            # stale node share it quietly), and pick the free port here when given 0.
            self.port = _claim_port(family, self.host, self.port)
        sock.bind((self.host, self.port))
        # Read now: the engine sets the interval for this node before starting the mux.
        # Same time to notice a vanished peer as aioice's (failures x 1.2 x interval),
        # in fewer, RFC 7675-paced checks: one per ~4.7 s instead of ~3.9 s by default.
        interval = internals.consent_interval() * internals.CONSENT_FAILURES / MUX_CONSENT_FAILURES
        if self._reuseport and self._want_plane and ConsentPlane.available():
            # The second socket of the reuseport group: where the program sends STUN.
            try:
                stun = _group_socket(family, self.host, self.port, _SOCKET_BUFFER)
                self.plane = ConsentPlane(stun, self.dispatch, interval, MUX_CONSENT_FAILURES)
            except OSError as exc:
                logger.warning("no consent plane on the ICE mux's port: %s", exc)
        if self._reuseport:
            program = _FIRST_SOCKET_PROGRAM if self.plane is None else _STUN_TO_SECOND_PROGRAM
            self._reuseport = _steer(sock, program)
            if not self._reuseport and self.plane is not None:
                self.plane.close()
                self.plane = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            self._timestamps = True
        except OSError:  # pragma: no cover - not Linux
            self._timestamps = False
        self._sock = sock
        self.fd = sock.fileno()
        self.port = sock.getsockname()[1]
        self.transport = _MuxTransport(sock)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)
        if self.plane is not None:
            self.consent = PlaneChecker(self.plane)
        else:
            self.consent = ConsentChecker(interval, MUX_CONSENT_FAILURES)
        self.consent.start()
        if self.plane is not None:
            self.plane.start()
        logger.info(
            "ICE mux listening on %s:%d (announced as %s, consent on %s)",
            self.host,
            self.port,
            self.announce,
            "its own thread" if self.plane is not None else "the event loop",
        )

    def send_sockets(self, count: int) -> list[int]:
        """File descriptors of ``count`` more sockets on the mux's address and port, for
        sending only (the egress threads', one each).

        They share the port through ``SO_REUSEPORT``, and a one-instruction BPF program
        keeps every arriving datagram on the mux's own socket. Nothing polls them, so
        freeing a sent packet wakes nobody; sending through the polled socket, every packet
        took its wait-queue lock, and threads sending through one socket fought over it
        and its send accounting (12% more CPU per packet with two threads). Empty where the
        kernel refuses (then the egress sends through the mux's socket).
        """
        if not self._reuseport or self._sock is None:
            return []
        fds: list[int] = []
        for _ in range(count):
            try:
                # Nothing reads it; a datagram that reaches it anyway must not pile up.
                sock = _group_socket(self._sock.family, self.host, self.port, 1)
            except OSError as exc:
                logger.warning("no send sockets on the ICE mux's port: %s", exc)
                break
            self._send_socks.append(sock)
            fds.append(sock.fileno())
        return fds

    def close(self) -> None:
        """Close the socket (sessions should be closed first, and nothing may send
        through :meth:`send_sockets` any more)."""
        if self.consent is not None:
            self.consent.cancel()
            self.consent = None
        if self.plane is not None:
            self.plane.close()
            self.plane = None
        # The send sockets leave the reuseport group first: the mux's stays its first.
        for sock in self._send_socks:
            sock.close()
        self._send_socks.clear()
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.fd)
            self._sock.close()
            self._sock = None
            self.transport = None
            self.fd = -1
            self.lost()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # Kernel receive timestamps (CLOCK_REALTIME) are mapped onto perf_counter, so
        # forwarding latency includes the time a packet waited in the socket.
        anchor = time.perf_counter()
        wall = time.time()
        for _ in range(_READ_BUDGET):
            try:
                if self._timestamps:
                    data, ancillary, _flags, addr = sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY)
                    received = anchor
                    for level, kind, payload in ancillary:
                        if level == socket.SOL_SOCKET and kind == _SCM_TIMESTAMPNS:
                            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                            received = min(anchor, anchor - (wall - seconds - nanoseconds * 1e-9))
                else:
                    data, addr = sock.recvfrom(_MAX_DATAGRAM)
                    received = time.perf_counter()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("ICE mux receive failed: %s", exc)
                return
            try:
                self.dispatch(data, (addr[0], addr[1]), received)
            except Exception:
                logger.exception("ICE mux failed to handle a datagram from %s", addr)

    def lost(self) -> None:
        for protocol in list(self._protocols):
            protocol.connection_lost(None)

    def new_ufrag(self) -> str:
        """An ICE username fragment no session on this mux uses."""
        while True:
            ufrag = "".join(secrets.choice(_UFRAG_ALPHABET) for _ in range(12))
            if ufrag not in self._by_ufrag:
                return ufrag

    def attach(self, connection: Connection) -> None:
        """Make ``connection`` gather its host candidate on this mux.

        Call before aiortc gathers (``setLocalDescription``). With a TURN server
        configured, the connection still gathers its relayed candidate the usual way.
        """
        internals.set_local_ufrag(connection, self.new_ufrag())

        async def gather() -> None:
            if internals.gathering_started(connection):
                return
            internals.mark_gathering(connection, started=True)
            candidate = Candidate(
                foundation=candidate_foundation("host", "udp", self.announce),
                component=1,
                transport="udp",
                priority=candidate_priority(1, "host"),
                host=self.announce,
                port=self.port,
                type="host",
            )
            protocol = MuxedStunProtocol(connection, self, candidate)
            self.register(protocol)
            internals.add_local_candidate(connection, protocol, candidate)
            internals.replace_consent(connection, lambda: self._keep_consent(protocol))
            if connection.turn_server is not None:
                for relayed in await connection.get_component_candidates(1, addresses=[]):
                    internals.add_local_candidate(connection, None, relayed)
            internals.mark_gathering(connection, started=True, ended=True)

        internals.replace_gatherer(connection, gather)

    def register(self, protocol: MuxedStunProtocol) -> None:
        """Accept STUN for the protocol's connection (by its username fragment)."""
        self._protocols.add(protocol)
        self._by_ufrag[protocol.receiver.local_username] = protocol

    def unregister(self, protocol: MuxedStunProtocol) -> None:
        """Forget a protocol and every address learned for it."""
        self._protocols.discard(protocol)
        ufrag = protocol.receiver.local_username
        if self._by_ufrag.get(ufrag) is protocol:
            del self._by_ufrag[ufrag]
        for address in protocol.addresses:
            if self._by_address.get(address) is protocol:
                del self._by_address[address]
        protocol.addresses.clear()
        protocol.srtp_handler = None
        protocol.on_moved = None
        self._publish_consent(protocol)

    def restart(self, connection: Connection, remote_ufrag: str, remote_password: str) -> str:
        """Restart ICE of ``connection`` with the app's new credentials (RFC 8445 section 9).

        The connection gets a new local username fragment and password, forgets its
        check list and remote candidates (once connected), and from now on answers and
        signs checks with the new credentials only; its nominated pair stays in use (media
        keeps flowing if the address did not change) until the app nominates a pair again,
        which :meth:`follow` then moves the session to.

        :returns: the new local password (the new ufrag is ``connection.local_username``).
        :raises LookupError: the connection is not (or no longer) on this mux.
        :raises ValueError: the app's credentials are not valid ICE credentials.
        """
        protocol = self._by_ufrag.get(connection.local_username)
        if protocol is None or protocol.receiver is not connection:
            raise LookupError("the connection is not on this ICE mux")
        validate_username(remote_ufrag)
        validate_password(remote_password)
        password = "".join(secrets.choice(_UFRAG_ALPHABET) for _ in range(_PASSWORD_LENGTH))
        ufrag = self.new_ufrag()
        del self._by_ufrag[connection.local_username]
        if internals.nominated_pair(connection) is not None:
            # Once connected, the old checks and candidates are stale. Before that, aioice's
            # connect() still runs the checks and fails the connection if they all go; they
            # are kept and carry on with the new credentials.
            internals.forget_checks(connection)
        internals.set_local_credentials(connection, ufrag, password)
        connection.remote_username = remote_ufrag
        connection.remote_password = remote_password
        self._by_ufrag[ufrag] = protocol
        self._publish_consent(protocol)
        logger.info("ICE restart of %s: new local ufrag %s", connection, ufrag)
        return password

    def follow(self, protocol: MuxedStunProtocol) -> None:
        """Move the session to its nominated pair's address, if that changed.

        Also follows a NAT rebinding: when the current address has stopped answering
        checks and another address of the session passed one recently, that address's
        pair becomes the nominated one.
        """
        connection = protocol.receiver
        pair = internals.nominated_pair(connection)
        if pair is None or pair.protocol is not protocol:
            # Not connected yet, or a relayed pair (aioice sends on it itself): nothing to
            # check on the mux.
            self._publish_consent(protocol)
            return
        address = pair.remote_addr
        if protocol.consent_misses and address == protocol.remote_address:
            rebound = self._rebound_pair(protocol, address)
            if rebound is not None:
                logger.info(
                    "%s: %s stopped answering, following its new address %s",
                    connection,
                    address,
                    rebound.remote_addr,
                )
                internals.set_nominated_pair(connection, rebound)
                address = rebound.remote_addr
        if address == protocol.remote_address:
            return
        previous = protocol.remote_address
        protocol.remote_address = address
        protocol.consent_misses = 0
        if previous is None:
            # The first nomination: the session takes its address when it connects.
            self._publish_consent(protocol)
            return
        logger.info("%s moved from %s to %s", connection, previous, address)
        for old in list(protocol.addresses):
            if old != address:
                protocol.addresses.discard(old)
                if self._by_address.get(old) is protocol:
                    del self._by_address[old]
        protocol.checked = {a: t for a, t in protocol.checked.items() if a == address}
        self._publish_consent(protocol)
        if protocol.on_moved is not None:
            protocol.on_moved(address)

    def _rebound_pair(self, protocol: MuxedStunProtocol, current: Address) -> CandidatePair | None:
        """The succeeded pair of another address checked most recently, within
        :data:`REBIND_WINDOW_S`, or ``None``."""
        horizon = time.monotonic() - REBIND_WINDOW_S
        best: CandidatePair | None = None
        best_time = horizon
        for pair in internals.check_list(protocol.receiver):
            address = pair.remote_addr
            checked = protocol.checked.get(address, 0.0)
            if (
                pair.protocol is protocol
                and address != current
                and address in protocol.addresses
                and pair.state == CandidatePair.State.SUCCEEDED
                and checked > best_time
            ):
                best, best_time = pair, checked
        return best

    async def _keep_consent(self, protocol: MuxedStunProtocol) -> None:
        """What runs in place of aioice's ``query_consent`` once ICE completed: the mux's
        checker keeps the session's consent until it expires (then the connection closes,
        as aioice would close it) or the connection closes (which cancels this)."""
        connection = protocol.receiver
        pair = internals.nominated_pair(connection)
        checker = self.consent
        if checker is None or pair is None or pair.protocol is not protocol:
            # A relayed pair (TURN) or a stopping mux: aioice's own consent task.
            await type(connection).query_consent(connection)
            return
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def expired() -> None:
            if not lost.done():
                lost.set_result(None)

        target = ConsentTarget(
            check=lambda: self._consent_check(protocol),
            send=self._send,
            expired=expired,
            on_answer=lambda address: self._consent_answered(protocol, address),
            on_miss=lambda address: self._consent_missed(protocol, address),
        )
        protocol.consent = target
        self._publish_consent(protocol)
        checker.track(target)
        try:
            await lost
        finally:
            checker.untrack(target)
            protocol.consent = None
            self._publish_consent(protocol)
        logger.info("%s: consent to send expired", connection)
        # Not awaited here: close() cancels the consent task, which is this one.
        asyncio.get_running_loop().create_task(connection.close())

    def _consent_check(self, protocol: MuxedStunProtocol) -> CheckParams | None:
        connection = protocol.receiver
        pair = internals.nominated_pair(connection)
        if pair is None or pair.protocol is not protocol or connection.remote_password is None:
            return None
        return CheckParams(
            username=f"{connection.remote_username}:{connection.local_username}",
            priority=candidate_priority(pair.component, "prflx"),
            tie_breaker=internals.tie_breaker(connection),
            controlling=connection.ice_controlling,
            password=connection.remote_password.encode("utf8"),
            address=pair.remote_addr,
        )

    def _consent_answered(self, protocol: MuxedStunProtocol, address: Address) -> None:
        protocol.checked[address] = time.monotonic()
        if address == protocol.remote_address:
            protocol.consent_misses = 0

    def _consent_missed(self, protocol: MuxedStunProtocol, address: Address) -> None:
        if address == protocol.remote_address:
            protocol.consent_misses += 1
            self.follow(protocol)

    def _publish_consent(self, protocol: MuxedStunProtocol) -> None:
        """Bring the consent plane up to date with ``protocol``: have it answer the checks
        :meth:`_answer_consent` would answer (while the mux keeps the session's consent,
        from its current address, with its current credentials) and no others, and check
        the session with what :meth:`_consent_check` says now."""
        plane = self.plane
        if plane is None:
            return
        if protocol.consent is not None and self.consent is not None:
            self.consent.refresh(protocol.consent)
        connection = protocol.receiver
        wanted: tuple[Address, str, str] | None = None
        if (
            protocol.consent is not None
            and protocol.remote_address is not None
            and protocol in self._protocols
        ):
            wanted = (
                protocol.remote_address,
                connection.local_username,
                connection.local_password,
            )
        current = protocol.answering
        if current == wanted:
            return
        if current is not None:
            plane.forget(current[0])
            protocol.answering = None
        if wanted is not None:
            conflict = ICE_CONTROLLING if connection.ice_controlling else ICE_CONTROLLED
            if plane.answer_for(wanted[0], wanted[1], wanted[2].encode("utf8"), conflict):
                protocol.answering = wanted

    def _send(self, data: bytes, address: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(data, address)

    def _answer_consent(self, protocol: MuxedStunProtocol, data: bytes, address: Address) -> bool:
        """Answer a peer's plain consent check from the session's current address;
        ``False`` leaves the datagram to aioice."""
        if protocol.consent is None or address != protocol.remote_address:
            return False
        connection = protocol.receiver
        password = connection.local_password.encode("utf8")
        request = parse_binding_request(data, connection.local_username, password)
        if request is None or request.use_candidate:
            return False
        conflict = ICE_CONTROLLING if connection.ice_controlling else ICE_CONTROLLED
        if request.role_attribute == conflict:
            return False
        self._send(binding_success(request.transaction_id, address, password), address)
        return True

    def sessions(self) -> int:
        """How many connections are registered."""
        return len(self._protocols)

    def dispatch(self, data: bytes, address: tuple[str, int], received: float = 0.0) -> None:
        """Route one datagram to the session it belongs to.

        :param received: when it arrived (``time.perf_counter()`` clock); now if 0.
        """
        if not data:
            return
        protocol = self._by_address.get(address)
        if protocol is None:
            protocol = self._learn(data, address)
            if protocol is None:
                return
        first = data[0]
        if 127 < first < 192:
            handler = protocol.srtp_handler
            if handler is not None:
                handler(data, received or time.perf_counter())
                return
        if first < 2:
            kind = (first << 8) | data[1] if len(data) > 1 else -1
            if kind == BINDING_REQUEST:
                if self._answer_consent(protocol, data, address):
                    return
            elif kind in (BINDING_SUCCESS, BINDING_ERROR):
                if self.consent is not None and self.consent.answered(data):
                    return
            protocol.datagram_received(data, address)
        else:
            # DTLS (and SRTP before the session takes it): what aioice does for non-STUN.
            protocol.receiver.data_received(data, 1)

    def _learn(self, data: bytes, address: tuple[str, int]) -> MuxedStunProtocol | None:
        """Bind a new source address to a session from an authenticated binding request."""
        if data[0] >= 2:
            return None
        try:
            message = stun.parse_message(data)
        except ValueError:
            return None
        if message.message_class != stun.Class.REQUEST or "USERNAME" not in message.attributes:
            return None
        ufrag = str(message.attributes["USERNAME"]).split(":", 1)[0]
        protocol = self._by_ufrag.get(ufrag)
        if protocol is None:
            return None
        password = protocol.receiver.local_password.encode("utf8")
        if not message.check_message_integrity(password):
            return None
        if len(protocol.addresses) >= _MAX_ADDRESSES:
            logger.info("session %s: too many ICE addresses, ignoring %s", ufrag, address)
            return None
        protocol.addresses.add(address)
        self._by_address[address] = protocol
        return protocol


def _claim_port(family: int, host: str, port: int) -> int:
    """Bind ``(host, port)`` without ``SO_REUSEPORT`` and let go: raises ``OSError``
    (EADDRINUSE) when anyone holds it; returns the port (the one picked, for 0)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port))
        return int(probe.getsockname()[1])


def _group_socket(family: int, host: str, port: int, receive_buffer: int) -> socket.socket:
    """A non-blocking socket joining ``(host, port)``'s reuseport group (the mux's, which
    must be bound first); raises ``OSError`` when the kernel refuses."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _join_reuseport(sock: socket.socket) -> bool:
    """Let send sockets share the mux's port (before bind)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return False
    return True


def _steer(sock: socket.socket, instructions: bytes) -> bool:
    """Attach a classic BPF program choosing the socket of the port's reuseport group for
    each datagram (after bind); ``False`` when the kernel refuses it."""
    program = ctypes.create_string_buffer(instructions)
    fprog = struct.pack("HxxxxxxQ", len(instructions) // 8, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        logger.info("ICE mux: no reuseport steering (%s); egress sends on the mux socket", exc)
        return False
    return True

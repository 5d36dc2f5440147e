"""An app's side of an ICE restart, and a UDP path between an app and media that can move.

aiortc cannot restart ICE, as an app or as media. :func:`restart_offer` and
:func:`apply_restart_answer` do what a browser's ``pc.restartIce()`` does, on an aiortc
app's aioice connection: new local credentials in a new offer (same m-lines, same DTLS
fingerprint), then the answer's credentials and candidates, and checks that nominate a pair
again (aioice nominates aggressively as the controlling side). The DTLS association and
SRTP contexts are kept.

:class:`UdpRelay` sits between an app and media, like a NAT: the app sends to the relay,
which forwards from a port of its own. :meth:`UdpRelay.rebind` moves that port (the NAT's
mapping changed, or the app's network did) and the old one goes dead.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import string

from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection
from aiortc import RTCPeerConnection

__all__ = [
    "UdpRelay",
    "apply_restart_answer",
    "app_ice_connection",
    "restart_offer",
    "route_via",
]

_ALPHABET = string.ascii_letters + string.digits


def app_ice_connection(pc: RTCPeerConnection) -> Connection:
    """The aioice connection under an app's bundled transceivers."""
    connection: Connection = pc.getTransceivers()[0].receiver.transport.transport._connection
    return connection


def _replace_credentials(sdp: str, ufrag: str, password: str) -> str:
    sdp = re.sub(r"(?m)^a=ice-ufrag:\S+", lambda _: f"a=ice-ufrag:{ufrag}", sdp)
    sdp = re.sub(r"(?m)^a=ice-pwd:\S+", lambda _: f"a=ice-pwd:{password}", sdp)
    return re.sub(
        r"(?m)^(o=\S+ \S+ )(\d+)", lambda m: f"{m.group(1)}{int(m.group(2)) + 1}", sdp, count=1
    )


def restart_offer(pc: RTCPeerConnection) -> str:
    """Give the app new ICE credentials and return its ICE-restart offer.

    The offer is the app's last local description with the new ``ice-ufrag``/``ice-pwd``
    (and the next session version): same m-lines, same fingerprint, same candidates.
    """
    connection = app_ice_connection(pc)
    ufrag = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    password = "".join(secrets.choice(_ALPHABET) for _ in range(24))
    connection._local_username = ufrag
    connection._local_password = password
    return _replace_credentials(pc.localDescription.sdp, ufrag, password)


async def apply_restart_answer(
    pc: RTCPeerConnection, answer: str, timeout: float = 10.0
) -> CandidatePair:
    """Take media's answer to an ICE restart and check until a pair is nominated again.

    :returns: the nominated pair.
    :raises TimeoutError: when no check succeeds in time.
    """
    connection = app_ice_connection(pc)
    ufrag = re.search(r"(?m)^a=ice-ufrag:(\S+)", answer)
    password = re.search(r"(?m)^a=ice-pwd:(\S+)", answer)
    assert ufrag and password, "the answer carries ICE credentials"
    connection.remote_username = ufrag.group(1)
    connection.remote_password = password.group(1)
    remote: list[Candidate] = []
    for line in answer.splitlines():
        if line.startswith("a=candidate:"):
            candidate = Candidate.from_sdp(line[len("a=candidate:") :].strip())
            if all((c.host, c.port) != (candidate.host, candidate.port) for c in remote):
                remote.append(candidate)
    # Forget the old checks (RFC 8445 section 9), as IceMux.restart does on media's side.
    for old in connection._check_list:
        if old.task is not None:
            old.task.cancel()
    connection._check_list.clear()
    connection._remote_candidates[:] = remote
    pairs = []
    for candidate in remote:
        for protocol in connection._protocols:
            if protocol.local_candidate.can_pair_with(candidate):
                pair = CandidatePair(protocol, candidate)
                pair.state = CandidatePair.State.WAITING
                connection._check_list.append(pair)
                pairs.append(pair)
    assert pairs, "nothing to check"

    async def check_all() -> CandidatePair:
        while True:
            for pair in pairs:
                if pair.state != CandidatePair.State.SUCCEEDED:
                    pair.state = CandidatePair.State.WAITING
                    await connection.check_start(pair)  # controlling: nominates it
                if connection._nominated.get(1) is pair:
                    return pair
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(check_all(), timeout)


def route_via(sdp: str, node: tuple[str, int], relay: tuple[str, int]) -> str:
    """Media's answer with its candidate pointing at the relay instead of the node."""
    return sdp.replace(f" {node[0]} {node[1]} typ host", f" {relay[0]} {relay[1]} typ host")


class UdpRelay:
    """A UDP path app → relay → node whose node-facing port can move.

    :param target: the node's ICE address.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._loop = asyncio.get_running_loop()
        self._front = self._socket()
        self._front_fd = self._front.fileno()
        self._loop.add_reader(self._front_fd, self._from_app)
        self._app: tuple[str, int] | None = None
        self._upstream = self._socket()
        self._upstream_fd = self._upstream.fileno()
        self._loop.add_reader(self._upstream_fd, self._from_node)
        self.forwarded = 0

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        return sock

    @property
    def address(self) -> tuple[str, int]:
        """Where the app sends (the node's address as the app knows it)."""
        host, port = self._front.getsockname()
        return host, port

    @property
    def source(self) -> tuple[str, int]:
        """Where the node sees the app's packets come from now."""
        host, port = self._upstream.getsockname()
        return host, port

    def _from_app(self) -> None:
        while True:
            try:
                data, addr = self._front.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            self._app = addr
            try:
                self._upstream.sendto(data, self.target)
                self.forwarded += 1
            except OSError:
                pass

    def _from_node(self) -> None:
        while True:
            try:
                data, addr = self._upstream.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            if self._app is not None and addr == self.target:
                try:
                    self._front.sendto(data, self._app)
                except OSError:
                    pass

    def rebind(self) -> tuple[str, int]:
        """Forward from a new port; the old one is closed (whatever media sends there is
        lost). Returns the new source address."""
        self._loop.remove_reader(self._upstream_fd)
        self._upstream.close()
        self._upstream = self._socket()
        self._upstream_fd = self._upstream.fileno()
        self._loop.add_reader(self._upstream_fd, self._from_node)
        return self.source

    def close(self) -> None:
        """Stop relaying."""
        for fd, sock in ((self._front_fd, self._front), (self._upstream_fd, self._upstream)):
            if sock.fileno() >= 0:
                self._loop.remove_reader(fd)
                sock.close()

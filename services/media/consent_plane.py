"""The consent plane: ICE consent (RFC 7675) of connected sessions, kept on a native
thread instead of the event loop.

At a thousand listeners the ICE mux's port carries about 400 consent messages a second:
each session's peer checks the node every few seconds and the node checks each session.
On the event loop every one of them was a wake-up of its own on cold caches, about
90 µs of Python and system calls each, a fifth of an idle node's CPU. Here a classic
BPF program on the port's ``SO_REUSEPORT`` group steers every STUN datagram (first byte
0 or 1, RFC 7983) to a socket of its own, which the C thread of ``native/consent_plane.c``
reads:

* a peer's consent check from an address the plane answers for (:meth:`answer_for`) is
  authenticated and answered there;
* an answer to one of the node's checks (:meth:`expect`) is authenticated there and
  queued; :class:`~services.media.consent.ConsentChecker` takes the queue
  (:meth:`take`) before each round of checks;
* everything else (connectivity checks, nominations, role conflicts, requests from other
  addresses, anything the thread is unsure of) is forwarded unchanged to the event loop,
  which handles it as if it had arrived on the mux's socket.

The thread never decides more than the Python code would: what it declines goes to the
Python path, which is also what runs when the native module is missing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from services.media import native
from services.media.metrics import CONSENT_MESSAGES

logger = logging.getLogger(__name__)

__all__ = ["ConsentPlane", "Address"]

Address = tuple[str, int]
_NATIVE: Any = native.MODULE
_SOCKET_BUFFER = 4 << 20
_FORWARD_BUFFER = 1 << 20
_MAX_DATAGRAM = 4096
_READ_BUDGET = 256
_TAKE_BATCH = 512


def _family_and_bytes(address: Address) -> tuple[int, bytes]:
    host = address[0]
    if ":" in host:
        return 6, socket.inet_pton(socket.AF_INET6, host)
    return 4, socket.inet_pton(socket.AF_INET, host)


class ConsentPlane:
    """The native consent thread of one ICE mux, and the event-loop end of its forwards.

    After :meth:`close` every method is a no-op (sessions closing after the mux still
    untrack their consent).

    Use :meth:`open`, which joins the socket to the mux's port; the mux then steers STUN
    to it (it must be the second socket of the port's reuseport group).

    :param stun_socket: the socket STUN arrives on (bound to the mux's port).
    :param dispatch: handles a forwarded datagram as the mux handles one it read.
    """

    def __init__(
        self, stun_socket: socket.socket, dispatch: Callable[[bytes, Address], None]
    ) -> None:
        self._stun = stun_socket
        self._dispatch = dispatch
        self._forward_in, self._forward_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (self._forward_in, self._forward_out):
            end.setblocking(False)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _FORWARD_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _FORWARD_BUFFER)
        self._answers = _NATIVE.ffi.new("struct spaces_consent_answer[]", _TAKE_BATCH)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exported = dict.fromkeys(("answered", "verified", "forwarded", "dropped"), 0)
        handle = _NATIVE.lib.spaces_consent_new(stun_socket.fileno(), self._forward_out.fileno())
        if handle == _NATIVE.ffi.NULL:
            self._close_sockets()
            raise OSError("the consent plane's thread did not start")
        self._handle: Any = handle

    @classmethod
    def open(
        cls, family: int, host: str, port: int, dispatch: Callable[[bytes, Address], None]
    ) -> ConsentPlane | None:
        """Join a socket to ``(host, port)``'s reuseport group and start the thread;
        ``None`` without the native module or when the kernel refuses."""
        if _NATIVE is None:
            return None
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            return cls(sock, dispatch)
        except OSError as exc:
            sock.close()
            logger.warning("no consent plane on the ICE mux's port: %s", exc)
            return None

    def start(self) -> None:
        """Handle forwarded datagrams on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._forward_in.fileno(), self._forwarded)

    def answer_for(self, address: Address, ufrag: str, password: bytes, conflict: int) -> bool:
        """Answer consent checks from ``address`` for the session with this local
        username fragment and password; ``conflict`` is the role attribute that would be
        a role conflict (those go to aioice). ``False`` when the thread cannot (the
        checks then keep reaching the event loop)."""
        if self._handle is None:
            return False
        family, raw = _family_and_bytes(address)
        name = ufrag.encode()
        result = _NATIVE.lib.spaces_consent_answer_for(
            self._handle, family, raw, address[1], name, len(name), password, len(password),
            conflict,
        )  # fmt: skip
        return bool(result == 0)

    def forget(self, address: Address) -> None:
        """Stop answering for ``address``."""
        if self._handle is None:
            return
        family, raw = _family_and_bytes(address)
        _NATIVE.lib.spaces_consent_forget(self._handle, family, raw, address[1])

    def expect(self, transaction_id: bytes, key: bytes) -> bool:
        """Take the answer to the check ``transaction_id``, signed with ``key`` (call
        before sending the check)."""
        if self._handle is None:
            return False
        result = _NATIVE.lib.spaces_consent_expect(self._handle, transaction_id, key, len(key))
        return bool(result == 0)

    def unexpect(self, transaction_id: bytes) -> None:
        """Stop expecting an answer to ``transaction_id``."""
        if self._handle is None:
            return
        _NATIVE.lib.spaces_consent_unexpect(self._handle, transaction_id)

    def take(self) -> list[tuple[bytes, bool, float]]:
        """``(transaction id, success, when)`` of the answers taken since the last call;
        ``when`` is on the ``time.monotonic()`` clock. Also brings
        ``spaces_media_consent_messages_total`` up to date."""
        out: list[tuple[bytes, bool, float]] = []
        if self._handle is None:
            return out
        self.export_metrics()
        answers = self._answers
        ffi = _NATIVE.ffi
        while True:
            count = _NATIVE.lib.spaces_consent_take(self._handle, answers, _TAKE_BATCH)
            for i in range(count):
                answer = answers[i]
                out.append((bytes(ffi.buffer(answer.tid, 12)), bool(answer.success), answer.when))
            if count < _TAKE_BATCH:
                return out

    def stats(self) -> dict[str, int]:
        """What the thread did: checks answered, answers verified, datagrams forwarded
        to the event loop, and datagrams dropped."""
        stats = _NATIVE.ffi.new("struct spaces_consent_stats *")
        if self._handle is not None:
            _NATIVE.lib.spaces_consent_stats(self._handle, stats)
        return {
            "answered": int(stats.answered),
            "verified": int(stats.verified),
            "forwarded": int(stats.forwarded),
            "dropped": int(stats.dropped),
        }

    def export_metrics(self) -> None:
        """Add what the thread did since the last call to the metrics."""
        for outcome, total in self.stats().items():
            if total > self._exported[outcome]:
                CONSENT_MESSAGES.labels(outcome).inc(total - self._exported[outcome])
                self._exported[outcome] = total

    def close(self) -> None:
        """Stop the thread and close the sockets."""
        if self._handle is None:
            return
        self.export_metrics()
        _NATIVE.lib.spaces_consent_free(self._handle)
        self._handle = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._forward_in.fileno())
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._stun.close()
        self._forward_in.close()
        self._forward_out.close()

    def _forwarded(self) -> None:
        receive = self._forward_in.recv
        header = _NATIVE.lib.SPACES_CONSENT_HEADER
        for _ in range(_READ_BUDGET):
            try:
                frame = receive(header + _MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("consent plane forward failed: %s", exc)
                return
            if frame[0] == 4:
                host = socket.inet_ntop(socket.AF_INET, frame[4:8])
            else:
                host = socket.inet_ntop(socket.AF_INET6, frame[4:20])
            try:
                self._dispatch(frame[header:], (host, frame[2] << 8 | frame[3]))
            except Exception:
                logger.exception("ICE mux failed to handle a datagram from %s", host)

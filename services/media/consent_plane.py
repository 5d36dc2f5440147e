"""The consent plane: ICE consent (RFC 7675) of connected sessions, kept on a native
thread instead of the event loop.

At a thousand listeners the ICE mux's port carries about 600 consent messages a second:
each session's peer checks the node every few seconds, and the node checks each session
and reads the answer. On the event loop every one of them was a wake-up of its own on
cold caches (the consent rounds were timers too), about 90 µs of Python and system calls
each: a fifth of an idle node's CPU. Here a classic BPF program on the port's
``SO_REUSEPORT`` group steers every STUN datagram (first byte 0 or 1, RFC 7983) to a
socket of its own, which the C thread of ``native/consent_plane.c`` reads:

* a peer's consent check from an address the plane answers for (:meth:`answer_for`) is
  authenticated and answered there, with the bytes the Python code would send;
* the node's own checks of every tracked session (:class:`PlaneChecker`) are sent,
  verified and counted there, with the rules of
  :class:`~services.media.consent.ConsentChecker`; the thread reports a miss, a recovery
  and an expiry to the event loop, which is all the ICE mux needs;
* everything else (connectivity checks, nominations, role conflicts, requests from other
  addresses, anything the thread is unsure of) is forwarded unchanged to the event loop,
  which handles it as if it had arrived on the mux's socket.

The thread never decides more than the Python code would: what it declines goes to the
Python path, which is also what runs without the native module.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from services.media import native
from services.media.consent import CheckParams, ConsentTarget

logger = logging.getLogger(__name__)

__all__ = ["Address", "ConsentPlane", "PlaneChecker"]

Address = tuple[str, int]
_NATIVE: Any = native.MODULE
_FORWARD_BUFFER = 1 << 20
_MAX_DATAGRAM = 4096
_READ_BUDGET = 256
_OUTCOMES = ("answered", "checked", "verified", "missed", "expired", "forwarded", "dropped")


def _family_and_bytes(address: Address) -> tuple[int, bytes]:
    host = address[0]
    if ":" in host:
        return 6, socket.inet_pton(socket.AF_INET6, host)
    return 4, socket.inet_pton(socket.AF_INET, host)


class ConsentPlane:
    """The native consent thread of one ICE mux, and the event-loop end of its forwards.

    The ICE mux joins ``stun_socket`` to its port and steers STUN to it (it must be the
    second socket of the port's reuseport group). The plane owns the socket from then on
    and closes it, also when the thread does not start (``OSError``). After
    :meth:`close` every method is a no-op (sessions closing after the mux still untrack
    their consent).

    :param stun_socket: the socket STUN arrives on (bound to the mux's port).
    :param dispatch: handles a forwarded datagram as the mux handles one it read.
    :param interval: mean seconds between two checks of a session.
    :param failures: unanswered checks in a row that expire a session's consent.
    """

    def __init__(
        self,
        stun_socket: socket.socket,
        dispatch: Callable[[bytes, Address], None],
        interval: float,
        failures: int,
    ) -> None:
        self._stun = stun_socket
        self._dispatch = dispatch
        self.interval = interval
        self.failures = failures
        self.on_event: Callable[[int, int], None] | None = None
        """Called with ``(event, session id)`` for the thread's reports
        (``SPACES_CONSENT_MISS``, ``_RECOVERED``, ``_EXPIRED`` of the native module)."""
        self._forward_in, self._forward_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (self._forward_in, self._forward_out):
            end.setblocking(False)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _FORWARD_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _FORWARD_BUFFER)
        self._loop: asyncio.AbstractEventLoop | None = None
        handle = _NATIVE.lib.spaces_consent_new(
            stun_socket.fileno(), self._forward_out.fileno(), interval, failures
        )
        if handle == _NATIVE.ffi.NULL:
            self._close_sockets()
            raise OSError("the consent plane's thread did not start")
        self._handle: Any = handle
        self._closed_totals = dict.fromkeys(_OUTCOMES, 0)
        _PLANES.add(self)

    @staticmethod
    def available() -> bool:
        """Whether the native module (and so the thread) is built."""
        return _NATIVE is not None

    @property
    def timeout(self) -> float:
        """Longest time without an answer before a session's consent runs out."""
        return self.failures * 1.2 * self.interval

    def start(self) -> None:
        """Handle forwarded datagrams and the thread's reports on the running loop."""
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

    def track(self, session: int, params: CheckParams) -> bool:
        """Check session ``session`` with ``params`` (a new one from one interval on; a
        tracked one from its next check on, no longer paused)."""
        if self._handle is None:
            return False
        family, raw = _family_and_bytes(params.address)
        body = params.body()
        result = _NATIVE.lib.spaces_consent_track(
            self._handle, session, family, raw, params.address[1], body, len(body),
            params.password, len(params.password),
        )  # fmt: skip
        return bool(result == 0)

    def pause(self, session: int) -> None:
        """Nothing to check for ``session`` for now: its consent clock stands still."""
        if self._handle is not None:
            _NATIVE.lib.spaces_consent_pause(self._handle, session)

    def untrack(self, session: int) -> None:
        """Stop checking ``session``."""
        if self._handle is not None:
            _NATIVE.lib.spaces_consent_untrack(self._handle, session)

    def tracked(self) -> int:
        """How many sessions the thread checks."""
        return 0 if self._handle is None else int(_NATIVE.lib.spaces_consent_tracked(self._handle))

    def stats(self) -> dict[str, int]:
        """What the thread did (see ``struct spaces_consent_stats``); frozen at close."""
        if self._handle is None:
            return dict(self._closed_totals)
        stats = _NATIVE.ffi.new("struct spaces_consent_stats *")
        _NATIVE.lib.spaces_consent_stats(self._handle, stats)
        return {outcome: int(getattr(stats, outcome)) for outcome in _OUTCOMES}

    def close(self) -> None:
        """Stop the thread and close the sockets."""
        if self._handle is None:
            return
        totals = self.stats()
        _NATIVE.lib.spaces_consent_free(self._handle)
        self._handle = None
        self._closed_totals = totals
        _CLOSED_TOTALS.update({k: _CLOSED_TOTALS[k] + v for k, v in totals.items()})
        _PLANES.discard(self)
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
            family = frame[0]
            try:
                if family == 0:
                    if self.on_event is not None:
                        self.on_event(frame[1], int.from_bytes(frame[4:12], "little"))
                    continue
                if family == 4:
                    host = socket.inet_ntop(socket.AF_INET, frame[4:8])
                else:
                    host = socket.inet_ntop(socket.AF_INET6, frame[4:20])
                self._dispatch(frame[header:], (host, frame[2] << 8 | frame[3]))
            except Exception:
                logger.exception("the ICE mux failed to handle what the consent plane sent")


class PlaneChecker:
    """:class:`~services.media.consent.ConsentChecker`'s interface, with the checks run
    by the consent plane's thread.

    The parameters of a session's checks are pushed to the thread when tracked and at
    every :meth:`refresh` (the ICE mux refreshes after an ICE restart or a move); a
    session with nothing to check is paused there, its consent clock standing still.

    :param plane: the running consent plane.
    """

    def __init__(self, plane: ConsentPlane) -> None:
        self.plane = plane
        self.interval = plane.interval
        self.failures = plane.failures
        self.timeout = plane.timeout
        self._ids = itertools.count(1)
        self._sessions: dict[ConsentTarget, int] = {}
        self._targets: dict[int, ConsentTarget] = {}
        self._pushed: dict[int, CheckParams | None] = {}
        plane.on_event = self._event

    def __len__(self) -> int:
        return len(self._targets)

    def start(self) -> None:
        """Nothing to start: the thread runs from the plane's start."""

    def cancel(self) -> None:
        """Stop checking (the plane's close stops the thread)."""
        self.plane.on_event = None

    async def stop(self) -> None:
        self.cancel()

    def track(self, target: ConsentTarget) -> None:
        """Check ``target``'s consent from now on (its first check after one interval)."""
        session = next(self._ids)
        self._sessions[target] = session
        self._targets[session] = target
        self._push(session, target.check())

    def refresh(self, target: ConsentTarget) -> None:
        """Push ``target``'s check parameters to the thread if they changed."""
        session = self._sessions.get(target)
        if session is None:
            return
        params = target.check()
        if params != self._pushed.get(session):
            self._push(session, params)

    def untrack(self, target: ConsentTarget) -> None:
        """Stop checking ``target`` (it closed)."""
        target.active = False
        session = self._sessions.pop(target, None)
        if session is not None:
            self._targets.pop(session, None)
            self._pushed.pop(session, None)
            self.plane.untrack(session)

    def answered(self, data: bytes) -> bool:
        """Answers to the node's checks are taken on the thread, never here."""
        return False

    def _push(self, session: int, params: CheckParams | None) -> None:
        self._pushed[session] = params
        if params is None:
            self.plane.pause(session)
        elif not self.plane.track(session, params):
            logger.warning("the consent plane refused a session's check parameters")

    def _event(self, event: int, session: int) -> None:
        target = self._targets.get(session)
        if target is None:
            return  # untracked meanwhile
        params = self._pushed.get(session)
        address = params.address if params is not None else ("", 0)
        lib = _NATIVE.lib
        if event == lib.SPACES_CONSENT_MISS:
            target.failures += 1
            if target.on_miss is not None:
                target.on_miss(address)
        elif event == lib.SPACES_CONSENT_RECOVERED:
            target.failures = 0
            if target.on_answer is not None:
                target.on_answer(address)
        elif event == lib.SPACES_CONSENT_EXPIRED:
            # The thread untracked it already.
            self._sessions.pop(target, None)
            self._targets.pop(session, None)
            self._pushed.pop(session, None)
            target.active = False
            try:
                target.expired()
            except Exception:
                logger.exception("consent expiry callback failed")


_PLANES: weakref.WeakSet[ConsentPlane] = weakref.WeakSet()
_CLOSED_TOTALS = dict.fromkeys(_OUTCOMES, 0)


class _PlaneMetrics(Collector):
    """``spaces_media_consent_messages_total{outcome}``: what every consent plane of this
    process did, read at scrape time (closed planes' totals are kept)."""

    def collect(self) -> Iterable[Metric]:
        totals = dict(_CLOSED_TOTALS)
        for plane in list(_PLANES):
            for outcome, value in plane.stats().items():
                totals[outcome] += value
        family = CounterMetricFamily(
            "spaces_media_consent_messages",
            "ICE consent STUN handled by the consent plane's thread, by outcome: answered "
            "(a peer's check), checked (a check of the node's sent), verified (an answer "
            "to it), missed (a check left unanswered), expired (a session's consent ran "
            "out), forwarded (other STUN, to the event loop), dropped (forged answers, "
            "full queues, failed sends).",
            labels=["outcome"],
        )
        for outcome in _OUTCOMES:
            family.add_metric([outcome], totals[outcome])
        yield family


REGISTRY.register(_PlaneMetrics())

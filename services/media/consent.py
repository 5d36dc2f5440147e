"""Consent traffic of connected sessions (RFC 7675), in microseconds instead of aioice's
generic STUN code.

Once a session's ICE pair is nominated, the only STUN on it is consent: the peer's
binding requests, which the node answers, and the node's own consent checks, whose
answers it awaits. aioice builds and parses each of these through its generic
``Message`` class (XOR-ing addresses byte by byte, parsing them with ``ipaddress``): about
a tenth of a core for a thousand connected listeners, which is CPU taken from
forwarding. This module handles exactly those messages with fixed layouts, ``hmac`` and
``zlib``; anything else (a nomination, a role conflict, a request from another address,
an ICE restart) still goes to aioice.

* :func:`parse_binding_request` and :func:`binding_success` answer a peer's check.
* The checking and sealing (HMAC-SHA1 integrity, CRC-32 fingerprint) run in C
  (``native/stun.c``) when the native module is built: each message used to cost about
  100 µs of Python and OpenSSL set-up on a cold cache, on its own event-loop wake-up. The
  Python code here is the reference the tests hold the C to, and the fallback.
* :class:`ConsentChecker` sends the node's checks for every tracked session on one timer
  and counts unanswered ones; after ``failures`` in a row, or its timeout after the last
  answer, it calls the session's expiry callback (RFC 7675: stop sending within 30 s of
  the last answer).

Where the native module is built, the ICE mux runs none of this on the event loop: the
consent plane's thread (:mod:`services.media.consent_plane`) answers, checks and counts
with the same rules, and this module's code handles only what the thread hands back.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import hmac
import itertools
import logging
import os
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.media import native

logger = logging.getLogger(__name__)

_NATIVE: Any = native.MODULE

__all__ = [
    "BindingRequest",
    "CheckParams",
    "ConsentChecker",
    "ConsentTarget",
    "binding_request",
    "binding_request_body",
    "binding_success",
    "parse_binding_request",
    "parse_binding_response",
]

COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", COOKIE)
_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE = struct.Struct("!HH")
_FINGERPRINT_XOR = 0x5354554E

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

CHECKS_PER_SLICE = 8
"""Consent checks sent per event-loop callback (about 0.1 ms each)."""
_SLACK_S = 0.05
"""Checks due this soon are sent with the ones due now."""
_INTEGRITY_SIZE = 24  # attribute header + HMAC-SHA1
_FINGERPRINT_SIZE = 8


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """An authenticated binding request (integrity and fingerprint checked).

    :ivar transaction_id: the 12-byte transaction id.
    :ivar use_candidate: it nominates the pair (aioice must see it).
    :ivar role_attribute: ICE-CONTROLLED or ICE-CONTROLLING was present (a role check
        aioice must make), else 0.
    """

    transaction_id: bytes
    use_candidate: bool
    role_attribute: int


def _with_length(data: bytes | bytearray | memoryview, end: int, extra: int) -> bytes:
    """``data[:end]`` with the header's length field as if the message ended ``extra``
    bytes after ``end`` (how integrity and fingerprint are computed)."""
    return bytes(data[:2]) + struct.pack("!H", end - 20 + extra) + bytes(data[4:end])


def _integrity(data: bytes, end: int, key: bytes) -> bytes:
    return hmac.digest(key, _with_length(data, end, _INTEGRITY_SIZE), "sha1")


def _fingerprint(data: bytes, end: int) -> int:
    return zlib.crc32(_with_length(data, end, _FINGERPRINT_SIZE)) ^ _FINGERPRINT_XOR


def _attributes(data: bytes) -> list[tuple[int, int, int]] | None:
    """``(type, value offset, value length)`` of every attribute, or ``None`` when the
    message is not well formed STUN."""
    total = len(data)
    if total < 20:
        return None
    _kind, length, cookie, _tid = _HEADER.unpack_from(data)
    if cookie != COOKIE or length != total - 20 or length % 4:
        return None
    found = []
    at = 20
    unpack = _ATTRIBUTE.unpack_from
    try:
        while at < total:
            kind, size = unpack(data, at)
            end = at + 4 + size
            if end > total:
                return None
            found.append((kind, at, size))
            at = end + (-size % 4)
    except struct.error:  # a truncated attribute header
        return None
    return found


def _authenticated(
    data: bytes, attributes: list[tuple[int, int, int]], key: bytes
) -> list[int] | None:
    """The attribute types before MESSAGE-INTEGRITY if it and any FINGERPRINT are valid."""
    kinds: list[int] = []
    for kind, at, size in attributes:
        if kind == MESSAGE_INTEGRITY:
            if size != 20 or not hmac.compare_digest(
                _integrity(data, at, key), data[at + 4 : at + 24]
            ):
                return None
            rest = [k for k, _, _ in attributes[len(kinds) + 1 :]]
            if rest and rest != [FINGERPRINT]:
                return None
            if rest:
                _, f_at, f_size = attributes[-1]
                if (
                    f_size != 4
                    or _fingerprint(data, f_at) != struct.unpack_from("!I", data, f_at + 4)[0]
                ):
                    return None
            return kinds
        kinds.append(kind)
    return None


def parse_binding_request(
    data: bytes, local_ufrag: str, local_password: bytes
) -> BindingRequest | None:
    """An authenticated binding request for ``local_ufrag``, or ``None`` (not one, or
    not valid: let aioice answer it, with the right error)."""
    if _NATIVE is None:
        return _parse_binding_request(data, local_ufrag, local_password)
    check = _native_check(data, local_password)
    if check is None or check.type != BINDING_REQUEST or not check.authenticated:
        return None
    if check.username_at < 0:
        return None
    name = data[check.username_at : check.username_at + check.username_size]
    if name.partition(b":")[0] != local_ufrag.encode():
        return None
    return BindingRequest(bytes(data[8:20]), bool(check.use_candidate), int(check.role))


def _native_check(data: bytes, key: bytes) -> Any:
    """``struct spaces_stun_check`` of a well-formed STUN message, else ``None``."""
    check = _NATIVE.ffi.new("struct spaces_stun_check *")
    if not _NATIVE.lib.spaces_stun_check(data, len(data), key, len(key), check):
        return None
    return check


def _parse_binding_request(
    data: bytes, local_ufrag: str, local_password: bytes
) -> BindingRequest | None:
    """:func:`parse_binding_request` in Python."""
    attributes = _attributes(data)
    if attributes is None or struct.unpack_from("!H", data)[0] != BINDING_REQUEST:
        return None
    kinds = _authenticated(data, attributes, local_password)
    if kinds is None:
        return None
    username = next(((at, size) for kind, at, size in attributes if kind == USERNAME), None)
    if username is None:
        return None
    at, size = username
    name = data[at + 4 : at + 4 + size]
    if name.partition(b":")[0] != local_ufrag.encode():
        return None
    role = next((k for k in kinds if k in (ICE_CONTROLLED, ICE_CONTROLLING)), 0)
    return BindingRequest(bytes(data[8:20]), USE_CANDIDATE in kinds, role)


def _xor_mapped_address(address: tuple[str, int], transaction_id: bytes) -> bytes:
    host, port = address[0], address[1]
    if ":" not in host:
        return _xor_mapped_ipv4(host, port)
    return _xor_mapped(host, port, transaction_id)


@functools.lru_cache(maxsize=4096)
def _xor_mapped_ipv4(host: str, port: int) -> bytes:
    """An IPv4 XOR-MAPPED-ADDRESS does not depend on the transaction: a peer's is the same
    at every check."""
    return _xor_mapped(host, port, b"")


def _xor_mapped(host: str, port: int, transaction_id: bytes) -> bytes:
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
        pad = _COOKIE_BYTES + transaction_id
        family = 2
    else:
        raw = socket.inet_pton(socket.AF_INET, host)
        pad = _COOKIE_BYTES
        family = 1
    masked = (int.from_bytes(raw, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(raw), "big")
    value = struct.pack("!BBH", 0, family, port ^ (COOKIE >> 16)) + masked
    return _ATTRIBUTE.pack(XOR_MAPPED_ADDRESS, len(value)) + value


def _sealed(kind: int, transaction_id: bytes, body: bytes, key: bytes) -> bytes:
    """A message of ``kind`` with ``body`` attributes, MESSAGE-INTEGRITY and FINGERPRINT."""
    if _NATIVE is None:
        return _sealed_python(kind, transaction_id, body, key)
    out = _NATIVE.ffi.new("uint8_t[]", 20 + len(body) + _INTEGRITY_SIZE + _FINGERPRINT_SIZE)
    size = _NATIVE.lib.spaces_stun_seal(out, kind, transaction_id, body, len(body), key, len(key))
    return bytes(_NATIVE.ffi.buffer(out, size))


def _sealed_python(kind: int, transaction_id: bytes, body: bytes, key: bytes) -> bytes:
    """:func:`_sealed` in Python."""
    data = _HEADER.pack(kind, len(body), COOKIE, transaction_id) + body
    data += _ATTRIBUTE.pack(MESSAGE_INTEGRITY, 20) + _integrity(data, len(data), key)
    data = _with_length(data, len(data), _FINGERPRINT_SIZE)
    return data + _ATTRIBUTE.pack(FINGERPRINT, 4) + struct.pack("!I", _fingerprint(data, len(data)))


def binding_success(
    transaction_id: bytes, address: tuple[str, int], local_password: bytes
) -> bytes:
    """The success response to a binding request from ``address`` (as aioice sends it:
    XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT)."""
    return _sealed(
        BINDING_SUCCESS,
        transaction_id,
        _xor_mapped_address(address, transaction_id),
        local_password,
    )


def binding_request_body(
    username: str, priority: int, tie_breaker: int, controlling: bool = False
) -> bytes:
    """The attributes of a consent check before its MESSAGE-INTEGRITY: USERNAME,
    PRIORITY, ICE-CONTROLLED or ICE-CONTROLLING (as aioice orders them)."""
    name = username.encode()
    return (
        _ATTRIBUTE.pack(USERNAME, len(name))
        + name
        + b"\0" * (-len(name) % 4)
        + _ATTRIBUTE.pack(PRIORITY, 4)
        + struct.pack("!I", priority)
        + _ATTRIBUTE.pack(ICE_CONTROLLING if controlling else ICE_CONTROLLED, 8)
        + struct.pack("!Q", tie_breaker)
    )


def binding_request(
    transaction_id: bytes,
    username: str,
    priority: int,
    tie_breaker: int,
    remote_password: bytes,
    controlling: bool = False,
) -> bytes:
    """A consent check (as aioice builds it: USERNAME, PRIORITY, ICE-CONTROLLED or
    ICE-CONTROLLING, MESSAGE-INTEGRITY, FINGERPRINT)."""
    body = binding_request_body(username, priority, tie_breaker, controlling)
    return _sealed(BINDING_REQUEST, transaction_id, body, remote_password)


def parse_binding_response(data: bytes, remote_password: bytes) -> tuple[bytes, bool] | None:
    """``(transaction id, success)`` of an authenticated binding response, else ``None``.

    An error response counts as an answer that refuses consent (``success`` false)."""
    if _NATIVE is None:
        return _parse_binding_response(data, remote_password)
    check = _native_check(data, remote_password)
    if check is None or check.type not in (BINDING_SUCCESS, BINDING_ERROR):
        return None
    if check.type == BINDING_SUCCESS and not check.authenticated:
        return None
    # 400/401 errors are not signed (RFC 8489 section 9.1.3); still a refusal.
    return bytes(data[8:20]), check.type == BINDING_SUCCESS


def _parse_binding_response(data: bytes, remote_password: bytes) -> tuple[bytes, bool] | None:
    """:func:`parse_binding_response` in Python."""
    attributes = _attributes(data)
    if attributes is None:
        return None
    kind = struct.unpack_from("!H", data)[0]
    if kind not in (BINDING_SUCCESS, BINDING_ERROR):
        return None
    if _authenticated(data, attributes, remote_password) is None:
        if kind == BINDING_SUCCESS:
            return None
        # 400/401 errors are not signed (RFC 8489 section 9.1.3); still a refusal.
    return bytes(data[8:20]), kind == BINDING_SUCCESS


@dataclass(frozen=True, slots=True)
class CheckParams:
    """What a session's consent checks carry and where they go.

    :ivar username: ``"<remote ufrag>:<local ufrag>"``.
    :ivar priority: the PRIORITY attribute.
    :ivar tie_breaker: the role attribute's tie-breaker.
    :ivar controlling: ICE-CONTROLLING (else ICE-CONTROLLED).
    :ivar password: the remote password (the checks' MESSAGE-INTEGRITY key).
    :ivar address: the session's current remote address.
    """

    username: str
    priority: int
    tie_breaker: int
    controlling: bool
    password: bytes
    address: tuple[str, int]

    def body(self) -> bytes:
        """The check's attributes before MESSAGE-INTEGRITY."""
        return binding_request_body(
            self.username, self.priority, self.tie_breaker, self.controlling
        )

    def request(self, transaction_id: bytes) -> bytes:
        """The check, sealed, with ``transaction_id``."""
        return _sealed(BINDING_REQUEST, transaction_id, self.body(), self.password)


@dataclass(eq=False)
class ConsentTarget:
    """One session whose consent the node checks.

    :ivar check: ``() -> CheckParams``, what the check to send now carries, or ``None``
        while there is nothing to check; called at every check (and, by the consent
        plane, at every :meth:`ConsentChecker.refresh`), so an ICE restart's new
        credentials or address are used from the next check on.
    :ivar send: sends a datagram to an address (the mux's socket).
    :ivar expired: called once when consent is lost.
    :ivar on_answer: called with the address of every answered check.
    :ivar on_miss: called with the address of every check left unanswered.
    :ivar last_answer: when consent was last confirmed (``time.monotonic()``): the last
        answer, or the last round with nothing to check.
    """

    check: Callable[[], CheckParams | None]
    send: Callable[[bytes, tuple[str, int]], None]
    expired: Callable[[], None]
    on_answer: Callable[[tuple[str, int]], None] | None = None
    on_miss: Callable[[tuple[str, int]], None] | None = None
    failures: int = 0
    pending: bytes | None = None
    pending_key: bytes = b""
    pending_address: tuple[str, int] = ("", 0)
    active: bool = True
    last_answer: float = field(default_factory=time.monotonic)


class ConsentChecker:
    """Every tracked session's consent checks on one timer (RFC 7675).

    A check goes out every ``interval`` x 0.8-1.2 per session; a check still unanswered
    when the next one is due counts as a failure, and ``failures`` in a row expire the
    session. Consent also runs out ``failures x 1.2 x interval`` (:attr:`timeout`) after
    the last answer whatever the count: counting alone could take one more randomized
    interval (a check unanswered since just after the last answer is counted only when
    the next is due), past RFC 7675's 30 s. A session's next check is never scheduled
    later than that moment.

    :param interval: mean time between checks of one session.
    :param failures: unanswered checks in a row that expire consent.
    """

    def __init__(self, interval: float, failures: int) -> None:
        self.interval = interval
        self.failures = failures
        self.timeout = failures * 1.2 * interval
        self._due: list[tuple[float, int, ConsentTarget]] = []
        self._order = itertools.count()
        self._pending: dict[bytes, ConsentTarget] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    def __len__(self) -> int:
        return sum(1 for _, _, target in self._due if target.active)

    def start(self) -> None:
        """Start checking (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._arm()

    def cancel(self) -> None:
        """Stop checking."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    async def stop(self) -> None:
        """Stop checking (for symmetry with :meth:`start` in async code)."""
        self.cancel()

    def track(self, target: ConsentTarget) -> None:
        """Check ``target``'s consent from now on (its first check after one interval)."""
        self._schedule(target)
        self._arm()

    def refresh(self, target: ConsentTarget) -> None:
        """``target``'s check parameters may have changed: nothing to do here, as
        :attr:`ConsentTarget.check` is called at every check."""

    def untrack(self, target: ConsentTarget) -> None:
        """Stop checking ``target`` (it closed)."""
        target.active = False
        if target.pending is not None:
            self._pending.pop(target.pending, None)
            target.pending = None

    def answered(self, data: bytes) -> bool:
        """Take a STUN response if it answers one of the checks; returns whether it did."""
        if len(data) < 20:
            return False
        target = self._pending.get(bytes(data[8:20]))
        if target is None:
            return False
        parsed = parse_binding_response(data, target.pending_key)
        if parsed is None:
            return True  # ours, but forged or corrupt: as if lost
        transaction_id, success = parsed
        del self._pending[transaction_id]
        target.pending = None
        if success:
            target.failures = 0
            target.last_answer = time.monotonic()
            if target.on_answer is not None:
                target.on_answer(target.pending_address)
        else:
            self._fail(target)
        return True

    def _schedule(self, target: ConsentTarget) -> None:
        due = time.monotonic() + self.interval * (0.8 + 0.4 * random.random())
        due = min(due, target.last_answer + self.timeout)
        heapq.heappush(self._due, (due, next(self._order), target))

    def _fail(self, target: ConsentTarget) -> None:
        target.failures += 1
        if target.on_miss is not None:
            target.on_miss(target.pending_address)
        if target.failures >= self.failures:
            self._expire(target)

    def _expire(self, target: ConsentTarget) -> None:
        if not target.active:
            return
        self.untrack(target)
        try:
            target.expired()
        except Exception:
            logger.exception("consent expiry callback failed")

    def _check(self, target: ConsentTarget) -> None:
        if target.pending is not None:
            self._pending.pop(target.pending, None)
            target.pending = None
            self._fail(target)
            if not target.active:
                return
        check = target.check()
        now = time.monotonic()
        if check is None:
            # Nothing to check right now (no nominated pair on the mux): consent is not
            # being assessed, so its clock stands still; again later.
            target.last_answer = now
            self._schedule(target)
            return
        if now - target.last_answer >= self.timeout:
            self._expire(target)
            return
        transaction_id = os.urandom(12)
        request = check.request(transaction_id)
        password, address = check.password, check.address
        target.pending = transaction_id
        target.pending_key = password
        target.pending_address = address
        self._pending[transaction_id] = target
        target.send(request, address)
        self._schedule(target)

    def _arm(self) -> None:
        """Have the timer fire when the earliest check is due (``loop.time()`` is
        ``time.monotonic()``)."""
        if self._loop is None or not self._due:
            return
        due = self._due[0][0]
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        # Checks due within the slack go out now too: a few wake-ups a second for
        # thousands of sessions instead of one per check.
        horizon = time.monotonic() + min(_SLACK_S, self.interval / 10)
        due = []
        while self._due and self._due[0][0] <= horizon:
            due.append(heapq.heappop(self._due)[2])
        # Checked after popping: a check reschedules its session, never into this round.
        self._check_slice(due)

    def _check_slice(self, due: list[ConsentTarget]) -> None:
        """Send a slice of a round's checks; the rest go in a later callback, so media
        packets that arrived meanwhile are forwarded first (ingress runs on this loop)."""
        if self._loop is None:
            return
        for target in due[:CHECKS_PER_SLICE]:
            if target.active:
                try:
                    self._check(target)
                except Exception:
                    logger.exception("consent check failed")
        if len(due) > CHECKS_PER_SLICE:
            self._loop.call_soon(self._check_slice, due[CHECKS_PER_SLICE:])
        else:
            self._arm()

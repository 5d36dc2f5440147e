"""Log-in throttling in Redis, shared by every identity replica.

Failed log-ins are counted in fixed windows, per handle (someone guessing one account's
password) and per client address (someone trying many accounts). Each attempt *reserves* a
slot in both counters atomically before the password is checked, so a burst of parallel
guesses cannot all slip through between a check and an increment; a successful log-in
hands its slots back (and clears the handle's count, since the password is known).

Once a counter reaches its limit, further attempts are refused until the window ends,
with the time left as ``RetryInfo``. Refused attempts still count, but never extend the
window. The handle limit lets anyone lock an account's log-in for one window by failing
on purpose; that is the usual price of stopping online guessing, and the window is short.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import re

import redis.asyncio
from redis.exceptions import RedisError

from services.common.errors import ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

__all__ = ["LoginSlot", "LoginThrottle", "client_address"]

_KEY_PREFIX = "spaces:identity:login-failures:"

# KEYS: the handle counter, the client counter. ARGV: window in ms.
# Returns for each key its count after this attempt and its remaining time in ms.
_RESERVE = """
local result = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  if count == 1 then
    redis.call('PEXPIRE', key, ARGV[1])
  end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    -- A counter that lost its expiry (e.g. written by hand) must not block forever.
    redis.call('PEXPIRE', key, ARGV[1])
    ttl = tonumber(ARGV[1])
  end
  result[#result + 1] = count
  result[#result + 1] = ttl
end
return result
"""

# KEYS: the handle counter, the client counter. Clears the first, gives one back on the
# second (never below zero, never touching its expiry).
_RELEASE = """
redis.call('DEL', KEYS[1])
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
if count > 0 then
  redis.call('DECR', KEYS[2])
end
return 1
"""

_PEER = re.compile(r"^(?:ipv4:(?P<v4>[0-9.]+):\d+|ipv6:\[(?P<v6>[0-9a-fA-F:.%]+)\]:\d+)$")


def client_address(peer: str | None, forwarded_for: str | None, trusted: bool) -> str:
    """The address a log-in comes from, for the per-client counter.

    :param peer: gRPC's ``context.peer()``, e.g. ``ipv4:10.0.0.7:51234``.
    :param forwarded_for: the ``x-forwarded-for`` metadata, if sent.
    :param trusted: whether the caller may vouch for the client (another Spaces service,
        i.e. the gateway, authenticated by its service token). Anyone else could forge the
        header to dodge the limit, so it is ignored for them.
    """
    if trusted and forwarded_for:
        first = forwarded_for.split(",", 1)[0].strip()
        if first:
            return first
    if peer:
        match = _PEER.match(peer)
        if match:
            return match.group("v4") or match.group("v6") or peer
        return peer
    return "unknown"


def _key(kind: str, value: str) -> str:
    # Hashed: keys stay short and uniform, and Redis never holds handles or addresses.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return f"{_KEY_PREFIX}{kind}:{digest}"


@dataclasses.dataclass(frozen=True)
class LoginSlot:
    """The counters one attempt reserved a slot in."""

    handle_key: str
    client_key: str


class LoginThrottle:
    """Counts failed log-ins per handle and per client address.

    :param redis: the shared Redis client.
    :param max_failures_per_handle: failures allowed per handle per window.
    :param max_failures_per_client: failures allowed per client address per window.
    :param window: length of a counting window.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        max_failures_per_handle: int,
        max_failures_per_client: int,
        window: dt.timedelta,
    ) -> None:
        self._redis = redis
        self._max_handle = max_failures_per_handle
        self._max_client = max_failures_per_client
        self._window_ms = max(1, int(window.total_seconds() * 1000))
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, handle: str, client: str) -> LoginSlot:
        """Reserve an attempt for ``handle`` (lower-cased) from ``client``.

        :raises ResourceExhausted: ``TOO_MANY_LOGIN_ATTEMPTS`` for the handle or
            ``RATE_LIMITED`` for the client, with the time until the window ends.
        :raises Unavailable: Redis cannot be reached. Log-in then fails closed: letting
            guesses through unthrottled is worse than a short outage of log-in.
        """
        slot = LoginSlot(_key("handle", handle), _key("client", client))
        try:
            raw = await self._reserve(
                keys=[slot.handle_key, slot.client_key], args=[self._window_ms]
            )
        except RedisError as error:
            logger.error("login throttle unavailable: %s", type(error).__name__)
            raise Unavailable(
                "log-in is temporarily unavailable", reason="DEPENDENCY_UNAVAILABLE"
            ) from None
        handle_count, handle_ttl, client_count, client_ttl = (int(v) for v in raw)
        if handle_count > self._max_handle:
            raise ResourceExhausted(
                "too many failed log-ins for this handle; try again later",
                reason="TOO_MANY_LOGIN_ATTEMPTS",
                quota_subject="handle",
                quota_description=f"{self._max_handle} failed log-ins per handle per window",
                retry_after=dt.timedelta(milliseconds=handle_ttl),
            )
        if client_count > self._max_client:
            raise ResourceExhausted(
                "too many failed log-ins from this client; try again later",
                reason="RATE_LIMITED",
                quota_subject="client",
                quota_description=f"{self._max_client} failed log-ins per client per window",
                retry_after=dt.timedelta(milliseconds=client_ttl),
            )
        return slot

    async def succeeded(self, slot: LoginSlot) -> None:
        """Give back a successful attempt's slots (best effort: it only loosens limits)."""
        try:
            await self._release(keys=[slot.handle_key, slot.client_key])
        except RedisError as error:
            logger.warning("could not release a login throttle slot: %s", type(error).__name__)

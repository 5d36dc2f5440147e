"""Per-client token buckets: in Redis so every replica shares them, or in this process.

Each client (a verified user, else an IP address) has a bucket of ``burst`` tokens refilled
at ``rate`` per second; a request takes one. The Redis bucket is one Lua script (read,
refill, take, write atomically) on the server's clock, so replicas with skewed clocks agree.
When Redis fails, the gateway keeps limiting with its local buckets rather than failing
every request or letting everything through.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import grpc
import redis.asyncio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from redis.exceptions import RedisError

from services.gateway.clients import ClientIdentifier
from services.gateway.errors import GatewayError

logger = logging.getLogger(__name__)

__all__ = [
    "Decision",
    "MemoryRateLimiter",
    "RateLimitGate",
    "RateLimiter",
    "RedisRateLimiter",
]


@dataclass(frozen=True)
class Decision:
    """The outcome for one request.

    :ivar allowed: whether it may proceed.
    :ivar retry_after_s: when refused, seconds until a token is back.
    """

    allowed: bool
    retry_after_s: float = 0.0


class RateLimiter(Protocol):
    """Takes a token from a client's bucket."""

    async def acquire(self, client: str) -> Decision:
        """Take one token of ``client``'s bucket if there is one."""
        ...


class MemoryRateLimiter:
    """Buckets in this process (one replica, tests, or Redis down).

    :param rate: tokens per second.
    :param burst: bucket size.
    :param max_clients: buckets kept; the least recently used are dropped beyond it.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def acquire(self, client: str) -> Decision:
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        decision = Decision(True)
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            decision = Decision(False, (1.0 - tokens) / self._rate)
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return decision


_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by the replicas.

    :param client: the Redis client.
    :param rate: tokens per second.
    :param burst: bucket size.
    :param key_prefix: namespace of the bucket keys.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        rate: float,
        burst: int,
        *,
        key_prefix: str = "spaces:gateway:ratelimit:",
    ) -> None:
        self._client = client
        self._rate = rate
        self._burst = burst
        self._prefix = key_prefix
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._fallback = MemoryRateLimiter(rate, burst)

    async def acquire(self, client: str) -> Decision:
        try:
            allowed, wait = await self._script(
                keys=[self._prefix + client], args=[self._rate, self._burst]
            )
        except (RedisError, OSError) as error:
            logger.warning("rate limit store unavailable, limiting locally: %s", error)
            return await self._fallback.acquire(client)
        if int(allowed):
            return Decision(True)
        return Decision(False, max(0.0, float(wait)))

    async def close(self) -> None:
        """Close the Redis client."""
        await self._client.aclose()


def retry_after_header(decision: Decision) -> str:
    """Whole seconds to wait, rounded up (``Retry-After`` takes no fractions)."""
    return str(max(1, math.ceil(decision.retry_after_s)))


class RateLimitGate:
    """Admits a request or refuses it with RESOURCE_EXHAUSTED (429).

    :param limiter: the buckets.
    :param identifier: names the client (``user:<id>`` or ``ip:<addr>``).
    :param description: the limit, as told to refused clients.
    """

    def __init__(
        self, limiter: RateLimiter, identifier: ClientIdentifier, description: str
    ) -> None:
        self._limiter = limiter
        self._identifier = identifier
        self._description = description

    async def admit(self, token: str | None, ip: str) -> None:
        """Take a token of the client's bucket.

        :raises GatewayError: 429 with QuotaFailure, RetryInfo and Retry-After when empty.
        """
        client = await self._identifier.key(token, ip)
        decision = await self._limiter.acquire(client)
        if decision.allowed:
            return
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=decision.retry_after_s))
        # The subject names the kind of client only: the id is the caller's own anyway,
        # and an IP address is not worth echoing.
        subject = client.partition(":")[0]
        raise GatewayError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too many requests; retry after the delay in RetryInfo",
            reason="RATE_LIMITED",
            details=[
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=subject, description=self._description
                        )
                    ]
                ),
                error_details_pb2.RetryInfo(retry_delay=delay),
            ],
            headers={"Retry-After": retry_after_header(decision)},
        )

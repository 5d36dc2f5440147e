"""Redis (or Valkey) clients."""

from __future__ import annotations

import logging

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

logger = logging.getLogger(__name__)

__all__ = ["create_redis"]


def create_redis(
    url: str,
    *,
    health_check_interval_s: int = 15,
    socket_timeout_s: float = 15.0,
    retries: int = 3,
) -> redis.asyncio.Redis:
    """Return a pooled async client for ``url`` (``redis://``, ``rediss://``, ``unix://``).

    Values come back as ``bytes`` (``decode_responses=False``): streams and caches hold
    serialized protobufs. Commands are retried with jittered backoff on connection errors
    and timeouts, so a failover or restart of the server is a short stall, not an error.

    :param url: the server's URL.
    :param health_check_interval_s: idle connections are PINGed before reuse after this long.
    :param socket_timeout_s: longest wait for a reply; keep it above any ``BLOCK`` time used.
    :param retries: retries of a command after a connection error.
    """
    client: redis.asyncio.Redis = redis.asyncio.from_url(
        url,
        decode_responses=False,
        health_check_interval=health_check_interval_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    return client

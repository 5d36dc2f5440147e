"""Redis buckets are shared by gateway replicas and survive a Redis outage locally."""

from __future__ import annotations

import redis.asyncio

from services.common.redis import create_redis
from services.gateway.ratelimit import RedisRateLimiter


async def test_replicas_share_one_bucket(redis_url: str) -> None:
    first = RedisRateLimiter(create_redis(redis_url), 0.1, 3)
    second = RedisRateLimiter(create_redis(redis_url), 0.1, 3)
    try:
        outcomes = [
            (await first.acquire("user:alice")).allowed,
            (await second.acquire("user:alice")).allowed,
            (await first.acquire("user:alice")).allowed,
            (await second.acquire("user:alice")).allowed,
        ]
        assert outcomes == [True, True, True, False]
        refused = await first.acquire("user:alice")
        assert not refused.allowed and 0 < refused.retry_after_s <= 10.0
        assert (await second.acquire("user:bob")).allowed
    finally:
        await first.close()
        await second.close()


async def test_keys_expire(redis_url: str, redis_client: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(create_redis(redis_url), 10.0, 5)
    try:
        await limiter.acquire("ip:1.2.3.4")
        ttl = await redis_client.pttl("spaces:gateway:ratelimit:ip:1.2.3.4")
        assert 0 < ttl <= 1500
    finally:
        await limiter.close()


async def test_redis_down_falls_back_to_local_buckets() -> None:
    limiter = RedisRateLimiter(
        create_redis("redis://127.0.0.1:1/0", retries=0, socket_timeout_s=0.5), 0.1, 1
    )
    try:
        assert (await limiter.acquire("ip:x")).allowed
        assert not (await limiter.acquire("ip:x")).allowed
    finally:
        await limiter.close()

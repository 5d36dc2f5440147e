"""Live delivery: new notifications reach open SubscribeNotifications streams on any replica.

Each new notification is PUBLISHed (serialized ``Notification``) on the recipient's Redis
channel ``spaces:notify:live:<user>``; a stream subscribes to its user's channel, so it does
not matter which replica created the notification and which one serves the stream.

Publishing a million messages for a fan-out nobody watches would cost more than the fan-out
itself, so streams also register their user in a sorted set of online users (score = expiry,
renewed while the stream lives) and writers publish only to users found there. A writer
checks *after* its transaction committed; a stream registers *before* it sends its first
message. So a notification is either published to the stream or already committed when the
app lists after that first message: nothing falls between the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio

from services.notify.convert import notification_pb
from services.notify.store import CreatedNotification

logger = logging.getLogger(__name__)

__all__ = ["ONLINE_KEY", "LiveHub", "channel_name"]

ONLINE_KEY = "spaces:notify:online"
CHANNEL_PREFIX = "spaces:notify:live:"


def channel_name(user_id: str) -> str:
    """The pub/sub channel of a user's live notifications."""
    return CHANNEL_PREFIX + user_id


class LiveHub:
    """Publishes notifications and serves subscriptions.

    :param redis: client (bytes responses).
    :param online_ttl_s: how long a subscription counts as online without renewal.
    """

    def __init__(self, redis: redis.asyncio.Redis, *, online_ttl_s: float = 60.0) -> None:
        self._redis = redis
        self._ttl_s = online_ttl_s

    async def online_among(self, user_ids: Sequence[str]) -> set[str]:
        """The users of ``user_ids`` with a live subscription somewhere."""
        if not user_ids:
            return set()
        now = time.time()
        online_count = await self._redis.zcount(ONLINE_KEY, now, "+inf")
        if online_count == 0:
            return set()
        if online_count <= len(user_ids):
            # Fewer people watching than ids in the batch: fetch them all, intersect locally
            # (one small reply instead of sending the whole batch to Redis).
            members: list[Any] = await self._redis.zrangebyscore(ONLINE_KEY, now, "+inf")
            watching = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
            return watching.intersection(user_ids)
        scores: list[Any] = await self._redis.zmscore(ONLINE_KEY, list(user_ids))
        return {
            user for user, score in zip(user_ids, scores, strict=True) if score and score >= now
        }

    async def publish_new(self, rows: Sequence[CreatedNotification]) -> int:
        """Publish freshly committed notifications to those of their users who are online.

        :return: how many were published.
        """
        if not rows:
            return 0
        online = await self.online_among(sorted({row.user_id for row in rows}))
        messages = [
            (row.user_id, notification_pb(row).SerializeToString())
            for row in rows
            if row.user_id in online
        ]
        await self.publish(messages)
        return len(messages)

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """PUBLISH each ``(user id, serialized Notification)``."""
        if not messages:
            return
        pipe = self._redis.pipeline(transaction=False)
        for user_id, data in messages:
            pipe.publish(channel_name(user_id), data)
        await pipe.execute()

    @asynccontextmanager
    async def subscription(self, user_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Subscribe to a user's channel; yields once the subscription is live.

        The yielded iterator returns each published message's data, forever.
        """
        pubsub = self._redis.pubsub()
        channel = channel_name(user_id)
        try:
            await pubsub.subscribe(channel)
            # Wait for the server's confirmation: only then are publications guaranteed to
            # reach us.
            while True:
                confirmation = await pubsub.get_message(timeout=5.0)
                if confirmation is None:
                    raise TimeoutError("no subscribe confirmation from Redis")
                if confirmation.get("type") in ("subscribe", b"subscribe"):
                    break
            await self._mark_online(user_id)
            yield self._messages(pubsub, user_id)
        finally:
            try:
                await pubsub.unsubscribe(channel)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _messages(self, pubsub: Any, user_id: str) -> AsyncIterator[bytes]:
        renew_every = self._ttl_s / 3
        renew_at = time.monotonic() + renew_every
        while True:
            wait = max(0.05, renew_at - time.monotonic())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if time.monotonic() >= renew_at:
                await self._mark_online(user_id)
                renew_at = time.monotonic() + renew_every
            if message is not None and message.get("type") in ("message", b"message"):
                data = message["data"]
                yield data if isinstance(data, bytes) else str(data).encode()

    async def _mark_online(self, user_id: str) -> None:
        # GT: never shorten another replica's registration of the same user.
        await self._redis.zadd(ONLINE_KEY, {user_id: time.time() + self._ttl_s}, gt=True)
        # Entries of users long gone are trimmed now and then by whoever registers.
        await self._redis.zremrangebyscore(ONLINE_KEY, "-inf", time.time() - self._ttl_s)

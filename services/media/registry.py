"""The media node registry in Redis: nodes, their load, the Spaces they serve, and the
state every node of a Space must agree on (permissions, closed Spaces, used grants).

Keys (prefix ``spaces:media:``)::

    nodes                       set of node ids ever registered and not yet cleaned up
    node:{id}                   JSON report of a live node, expiring after the node TTL
    node:{id}:peers             hash "space/participant" -> session id (live sessions)
    node:{id}:pending           zset "space/participant" -> ms time (placed, not connected)
    space:{space}               hash origin, record, closed, open_ms
    space:{space}:perms         hash participant -> "revision:may_publish:muted:removed"
    space:{space}:recordings    hash recording id -> JSON description
    grant:{jti}                 a used grant's nonce, until the grant expires
    failover:{id}               lock of the node that moves a dead node's participants

A node's report expires by itself when the node stops reporting, so "is this node alive"
is "does its key exist". Every node subscribes to the ``spaces:media:control`` channel;
permission changes and Space closings are written to Redis first and then published there,
so a node that missed a message still finds the truth in the hashes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import redis.asyncio

logger = logging.getLogger(__name__)

__all__ = [
    "CONTROL_CHANNEL",
    "NodeInfo",
    "NodeRegistry",
    "ParticipantPermissions",
    "SpaceRecord",
    "SpaceShare",
]

_PREFIX = "spaces:media:"
CONTROL_CHANNEL = _PREFIX + "control"
_PENDING_TTL_MS = 30_000
_OPEN_SPACE_TTL_S = 7 * 24 * 3600
_CLOSED_SPACE_TTL_S = 24 * 3600

# Applies a permission update unless a newer revision is stored; publishes it when applied.
_SET_PERMISSIONS = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local revision = tonumber(string.match(current, '^(%d+):'))
  if revision and revision > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""

# Sets the Space's origin to ARGV[1] unless it is open elsewhere (or closed).
# Returns {status, origin}: status 'closed', 'kept' or 'set'.
_CLAIM_ORIGIN = """
if redis.call('HGET', KEYS[1], 'closed') == '1' then return {'closed', ''} end
local origin = redis.call('HGET', KEYS[1], 'origin')
if origin and origin ~= '' and origin ~= ARGV[2] then return {'kept', origin} end
redis.call('HSET', KEYS[1], 'origin', ARGV[1])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'record', '1') end
redis.call('HSETNX', KEYS[1], 'open_ms', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'set', ARGV[1]}
"""


@dataclasses.dataclass(frozen=True)
class SpaceShare:
    """One Space's load on a node, as the node reports it."""

    space: str
    publishers: int
    listeners: int
    origin: bool


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """A live node's last report.

    :param node_id: the node's id (``media-3``).
    :param address: its gRPC address.
    :param endpoint: public signalling URL for apps ('' for the gateway).
    :param draining: whether it takes no new Spaces or participants.
    :param capacity: peers it accepts.
    :param publishers: connected publishing peers.
    :param listeners: connected listening peers.
    :param relays: relay streams it serves or pulls.
    :param report_time: when it reported (Unix seconds).
    :param drain_deadline: when its remaining sessions are closed (Unix seconds).
    :param spaces: its load per Space.
    :param pending: participants placed on it that have not connected yet (filled in by
        the registry when it reads the node).
    """

    node_id: str
    address: str
    endpoint: str
    draining: bool
    capacity: int
    publishers: int
    listeners: int
    relays: int
    report_time: float
    drain_deadline: float | None = None
    spaces: tuple[SpaceShare, ...] = ()
    pending: int = 0

    @property
    def peers(self) -> int:
        """Connected peers plus those on their way."""
        return self.publishers + self.listeners + self.pending

    @property
    def load(self) -> float:
        """Occupancy from 0 (idle) to 1 (full)."""
        return min(1.0, self.peers / self.capacity) if self.capacity else 1.0

    @property
    def has_room(self) -> bool:
        """Whether placement may send it one more peer."""
        return not self.draining and self.peers < self.capacity

    def to_json(self) -> str:
        """Serialize the report (``pending`` is not part of it)."""
        fields = dataclasses.asdict(self)
        fields.pop("pending")
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str, pending: int = 0) -> NodeInfo:
        """Parse a report."""
        fields: dict[str, Any] = json.loads(raw)
        fields["spaces"] = tuple(SpaceShare(**share) for share in fields.get("spaces", ()))
        return cls(**fields, pending=pending)


@dataclasses.dataclass(frozen=True)
class SpaceRecord:
    """What the registry knows of a Space."""

    space: str
    origin: str | None
    record: bool
    closed: bool
    open_time: float | None


@dataclasses.dataclass(frozen=True)
class ParticipantPermissions:
    """A participant's permissions as rooms last set them."""

    may_publish: bool
    muted: bool
    removed: bool
    revision: int

    def encode(self) -> str:
        """The hash value: ``revision:may_publish:muted:removed``."""
        flags = (int(self.may_publish), int(self.muted), int(self.removed))
        return f"{self.revision}:{flags[0]}:{flags[1]}:{flags[2]}"

    @classmethod
    def decode(cls, raw: bytes | str) -> ParticipantPermissions:
        """Parse a hash value."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        revision, may_publish, muted, removed = text.split(":")
        return cls(may_publish == "1", muted == "1", removed == "1", int(revision))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class NodeRegistry:
    """Reads and writes the registry.

    :param client: the Redis client (bytes responses).
    :param node_ttl_s: how long a report stays valid.
    """

    def __init__(self, client: redis.asyncio.Redis, node_ttl_s: float = 4.0) -> None:
        self.redis = client
        self.node_ttl_ms = int(node_ttl_s * 1000)
        self._set_permissions = client.register_script(_SET_PERMISSIONS)
        self._claim_origin = client.register_script(_CLAIM_ORIGIN)

    # -- nodes -------------------------------------------------------------------------

    async def report(self, node: NodeInfo) -> None:
        """Publish a node's report; it expires unless reported again within the TTL."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_PREFIX + f"node:{node.node_id}", node.to_json(), px=self.node_ttl_ms)
            pipe.sadd(_PREFIX + "nodes", node.node_id)
            await pipe.execute()

    async def deregister(self, node_id: str) -> None:
        """Remove a node that stopped cleanly (its sessions are gone)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                _PREFIX + f"node:{node_id}",
                _PREFIX + f"node:{node_id}:peers",
                _PREFIX + f"node:{node_id}:pending",
            )
            pipe.srem(_PREFIX + "nodes", node_id)
            await pipe.execute()

    async def node(self, node_id: str) -> NodeInfo | None:
        """A live node's report, or ``None`` when it is not alive."""
        raw = await self.redis.get(_PREFIX + f"node:{node_id}")
        if raw is None:
            return None
        return NodeInfo.from_json(raw, await self._pending(node_id))

    async def nodes(self) -> tuple[list[NodeInfo], list[str]]:
        """Live nodes, and the ids of registered nodes whose report has expired."""
        ids = sorted(_text(raw) or "" for raw in await self.redis.smembers(_PREFIX + "nodes"))
        if not ids:
            return [], []
        now_ms = int(time.time() * 1000)
        # One round trip: every report and every node's count of pending placements.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([_PREFIX + f"node:{i}" for i in ids])
            for node_id in ids:
                key = _PREFIX + f"node:{node_id}:pending"
                pipe.zremrangebyscore(key, 0, now_ms - _PENDING_TTL_MS)
                pipe.zcard(key)
            reports, *counts = await pipe.execute()
        pending = counts[1::2]
        live: list[NodeInfo] = []
        dead: list[str] = []
        for node_id, raw, waiting in zip(ids, reports, pending, strict=True):
            if raw is None:
                dead.append(node_id)
            else:
                live.append(NodeInfo.from_json(raw, int(waiting)))
        return live, dead

    async def address_of(self, node_id: str) -> str | None:
        """The gRPC address of a live node (the gateway's node resolver)."""
        raw = await self.redis.get(_PREFIX + f"node:{node_id}")
        return NodeInfo.from_json(raw).address if raw is not None else None

    async def _pending(self, node_id: str) -> int:
        key = _PREFIX + f"node:{node_id}:pending"
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, 0, now_ms - _PENDING_TTL_MS)
            pipe.zcard(key)
            _, count = await pipe.execute()
        return int(count)

    async def add_pending(self, node_id: str, space: str, participant: str) -> None:
        """Count a participant placed on a node until it connects (or 30 s pass)."""
        key = _PREFIX + f"node:{node_id}:pending"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {f"{space}/{participant}": int(time.time() * 1000)})
            pipe.pexpire(key, _PENDING_TTL_MS)
            await pipe.execute()

    # -- peers of a node -----------------------------------------------------------------

    async def peer_connected(
        self, node_id: str, space: str, participant: str, session_id: str
    ) -> None:
        """Record a live session (and that its placement has arrived)."""
        member = f"{space}/{participant}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(_PREFIX + f"node:{node_id}:peers", member, session_id)
            pipe.zrem(_PREFIX + f"node:{node_id}:pending", member)
            await pipe.execute()

    async def peer_closed(
        self, node_id: str, space: str, participant: str, session_id: str
    ) -> None:
        """Forget a session that closed, unless a newer one of the participant replaced it."""
        key = _PREFIX + f"node:{node_id}:peers"
        member = f"{space}/{participant}"
        if _text(await self.redis.hget(key, member)) == session_id:
            await self.redis.hdel(key, member)

    async def peers(self, node_id: str) -> dict[str, list[str]]:
        """Participants with a live session on a node, by Space."""
        raw = await self.redis.hkeys(_PREFIX + f"node:{node_id}:peers")
        by_space: dict[str, list[str]] = {}
        for member in raw:
            space, _, participant = (_text(member) or "").partition("/")
            by_space.setdefault(space, []).append(participant)
        return by_space

    async def claim_failover(self, node_id: str, owner: str, ttl_s: float = 30.0) -> bool:
        """Take the lock that lets one node move a dead node's participants."""
        return bool(
            await self.redis.set(
                _PREFIX + f"failover:{node_id}", owner, nx=True, px=int(ttl_s * 1000)
            )
        )

    # -- Spaces ------------------------------------------------------------------------

    async def space(self, space: str) -> SpaceRecord:
        """The Space's record (an unknown Space has no origin and is not closed)."""
        fields = await self.redis.hgetall(_PREFIX + f"space:{space}")
        values = {_text(k): _text(v) for k, v in fields.items()}
        open_ms = values.get("open_ms")
        return SpaceRecord(
            space=space,
            origin=values.get("origin") or None,
            record=values.get("record") == "1",
            closed=values.get("closed") == "1",
            open_time=int(open_ms) / 1000 if open_ms else None,
        )

    async def claim_origin(
        self, space: str, node_id: str, *, replacing: str | None = None, record: bool = False
    ) -> tuple[str, str]:
        """Make ``node_id`` the Space's origin unless another node already is (or, with
        ``replacing``, unless the origin is no longer that node).

        :returns: ``("set", node_id)``, ``("kept", origin)`` or ``("closed", "")``.
        """
        status, origin = await self._claim_origin(
            keys=[_PREFIX + f"space:{space}"],
            args=[
                node_id,
                replacing or "",
                "1" if record else "0",
                int(time.time() * 1000),
                _OPEN_SPACE_TTL_S,
            ],
        )
        return _text(status) or "", _text(origin) or ""

    async def set_recording(self, space: str) -> None:
        """Turn recording on for an open Space (never off)."""
        await self.redis.hset(_PREFIX + f"space:{space}", "record", "1")

    async def close_space(self, space: str) -> bool:
        """Mark the Space closed (for a day) and tell every node.

        :returns: whether this call closed it (``False`` when it already was).
        """
        key = _PREFIX + f"space:{space}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, "closed")
            pipe.hset(key, "closed", "1")
            pipe.expire(key, _CLOSED_SPACE_TTL_S)
            pipe.expire(_PREFIX + f"space:{space}:perms", _CLOSED_SPACE_TTL_S)
            pipe.publish(CONTROL_CHANNEL, json.dumps({"kind": "close", "space": space}))
            was_closed, *_ = await pipe.execute()
        return _text(was_closed) != "1"

    # -- permissions ---------------------------------------------------------------------

    async def set_permissions(
        self, space: str, participant: str, permissions: ParticipantPermissions
    ) -> bool:
        """Store a participant's permissions and tell every node.

        :returns: ``False`` when a newer revision is already stored (nothing changes).
        """
        message = json.dumps(
            {"kind": "permissions", "space": space, "participant": participant}
            | dataclasses.asdict(permissions)
        )
        applied = await self._set_permissions(
            keys=[_PREFIX + f"space:{space}:perms", CONTROL_CHANNEL],
            args=[
                participant,
                permissions.revision,
                permissions.encode(),
                message,
                _OPEN_SPACE_TTL_S,
            ],
        )
        return bool(applied)

    async def permissions(self, space: str, participant: str) -> ParticipantPermissions | None:
        """A participant's stored permissions, if rooms ever set them."""
        raw = await self.redis.hget(_PREFIX + f"space:{space}:perms", participant)
        return ParticipantPermissions.decode(raw) if raw is not None else None

    # -- grants --------------------------------------------------------------------------

    async def use_grant(self, nonce: str, expires_at: float) -> bool:
        """Mark a grant used; ``False`` when it was used before (a replay)."""
        ttl_ms = max(1000, int((expires_at - time.time()) * 1000) + 10_000)
        return bool(await self.redis.set(_PREFIX + f"grant:{nonce}", b"1", nx=True, px=ttl_ms))

    # -- recordings ------------------------------------------------------------------------

    async def recordings(self, space: str) -> list[dict[str, Any]]:
        """Descriptions of a Space's recordings, oldest first."""
        raw = await self.redis.hvals(_PREFIX + f"space:{space}:recordings")
        items = [json.loads(value) for value in raw]
        return sorted(items, key=lambda item: (item.get("create_time", 0), item.get("id", "")))

    async def put_recording(self, space: str, recording: Mapping[str, Any]) -> None:
        """Store (or replace) a recording's description."""
        await self.redis.hset(
            _PREFIX + f"space:{space}:recordings", str(recording["id"]), json.dumps(recording)
        )

    # -- control channel -----------------------------------------------------------------

    async def control_messages(self) -> AsyncIterator[dict[str, Any]]:
        """Messages on the control channel, forever (resubscribing after a disconnect)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CONTROL_CHANNEL)
            async for message in pubsub.listen():
                data = message.get("data")
                if isinstance(data, bytes | str):
                    try:
                        yield json.loads(data)
                    except ValueError:
                        logger.warning("ignored a malformed control message")
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        """Send a message to every node."""
        await self.redis.publish(CONTROL_CHANNEL, json.dumps(dict(message)))

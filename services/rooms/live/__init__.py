"""Live events of Spaces: the ordered log, the fan-out, and WatchSpace streams.

* :class:`SpaceEventLog` appends each live change to its Space's durable log in
  PostgreSQL, inside the transaction making the change; the log numbers it (one total order
  per Space, whichever replica writes) and, once committed, publishes it to the Space's
  Redis stream. It also coalesces reactions and speaking levels into a few events a second.
* :class:`LiveHub` (one per process) follows the Redis streams of the Spaces watched here,
  releases events strictly in order (repairing holes from PostgreSQL) and serves
  :meth:`LiveHub.watch`, the body of ``RoomsService.WatchSpace``.

Wiring, in the rooms ``main.py``::

    live = LiveSettings()
    event_log = SpaceEventLog(pool, redis, live)
    hub = LiveHub(pool, redis, live)
    service.on_startup(event_log.start)   # then hub.start
    service.on_shutdown(event_log.stop)   # and hub.stop

In a servicer::

    async with pool.connection() as conn, conn.transaction():
        ...  # the change
        await event_log.append(conn, space_id, SpaceEvent(role_changed=...))

    async def WatchSpace(self, request, context):
        async for response in hub.watch(space_id, request.resume_token, snapshot):
            yield response

``hub.watch_encoded`` yields the same responses already serialized, for a method registered
with a pass-through serializer (``services.rooms.api.add_to_server``): a live response
shared by a Space's watchers is then encoded once, not once per watcher.
"""

from services.rooms.live.codec import EPHEMERAL_KINDS, stream_key
from services.rooms.live.hub import LiveHub
from services.rooms.live.log import SpaceEventLog, resume_tokens
from services.rooms.live.settings import LiveSettings
from services.rooms.live.tokens import ResumeTokens
from services.rooms.live.watch import EventFilter, SnapshotProvider

__all__ = [
    "EPHEMERAL_KINDS",
    "EventFilter",
    "LiveHub",
    "LiveSettings",
    "ResumeTokens",
    "SnapshotProvider",
    "SpaceEventLog",
    "resume_tokens",
    "stream_key",
]

"""One media node: the engine plus what makes it part of a fleet.

:class:`MediaNode` is what the gRPC layer (:mod:`services.media.api`) calls. It

* reports the node's load to the registry every heartbeat, and notices dead nodes there
  (the first live node to take a dead node's failover lock asks rooms to move its
  participants);
* applies permission changes and Space closings arriving from any node over the
  registry's control channel (a change reaches every node holding a session of the
  participant, whichever node rooms called);
* places Spaces and participants (:mod:`services.media.placement`);
* verifies media grants (signature, expiry, user, node, single use) before negotiating;
* reports peer states and speaking levels to rooms;
* drains: stops taking peers, asks rooms to move its participants, and keeps forwarding
  until they have gone or the grace period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from spaces.media.v1 import media_events_pb2 as media_events
from spaces.media.v1 import media_resources_pb2 as media_res
from spaces.media.v1 import media_service_pb2 as media_pb

from services.common.admission import Admission
from services.common.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.events import publish_event
from services.common.grants import MediaGrantVerifier
from services.common.ids import new_id
from services.common.tasks import reraise_if_cancelling, stop_tasks
from services.media.captions import CaptionSegmentData, CaptionWorker
from services.media.convert import recording_message
from services.media.engine import MediaEngine, Negotiation
from services.media.levels import SpeakerLevel
from services.media.metrics import RELAY_STREAMS
from services.media.peer import Layout
from services.media.placement import best_edge, best_node, origin_usable
from services.media.recording import SpaceRecorder
from services.media.registry import (
    NodeInfo,
    NodeRegistry,
    ParticipantPermissions,
    SpaceRecord,
    SpaceShare,
)
from services.media.relay import RelayClient
from services.media.sdp import parse_offer
from services.media.session import Session

logger = logging.getLogger(__name__)

__all__ = ["MediaNode", "NodeLink", "NodeOptions", "PeerChange", "Placement", "RoomsLink"]

_NO_CAPACITY_RETRY_S = 5.0
_RECONNECT_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class PeerChange:
    """A session's state change, for rooms (``state``: connected or closed)."""

    space: str
    participant: str
    session: str
    connected: bool
    observe_time: float


class RoomsLink(Protocol):
    """What a media node tells rooms."""

    async def report_peer_states(self, node: str, changes: Sequence[PeerChange]) -> None:
        """Sessions that connected or closed."""

    async def report_levels(
        self, space: str, levels: Sequence[SpeakerLevel], observe_time: float
    ) -> None:
        """Speaking levels of a Space's publishers."""

    async def request_reconnect(
        self, space: str, participants: Sequence[str], *, draining: bool, from_node: str
    ) -> None:
        """Ask rooms to place participants again and send them a media-reconnect event."""

    async def post_caption(self, space: str, segment: CaptionSegmentData) -> None:
        """A live caption segment."""


class NodeLink(Protocol):
    """Calls from one media node to another (an edge to a Space's origin)."""

    async def open_relay(
        self, address: str, space: str, edge_node: str, sdp_offer: str
    ) -> tuple[str, str]:
        """OpenRelay on the node at ``address``; returns ``(relay id, SDP answer)``."""

    async def close_relay(self, address: str, space: str, relay: str) -> None:
        """CloseRelay on the node at ``address``."""

    def read_recording(
        self, address: str, request: media_pb.ReadRecordingRequest
    ) -> AsyncIterator[media_pb.ReadRecordingResponse]:
        """ReadRecording on the node at ``address``, as the calling user."""


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """How a node takes part in the fleet.

    :param node_id: the node's id.
    :param address: its gRPC address (for the gateway and other nodes).
    :param endpoint: public signalling URL for apps ('' for the gateway).
    :param capacity: peers it accepts.
    :param heartbeat_s: seconds between reports.
    :param drain_grace_s: default drain grace.
    :param levels_interval_s: seconds between level reports to rooms.
    :param recordings_dir: where recordings are written (``None``: the node records none).
    :param recording_retention_s: how long a finished recording stays available.
    :param captions: whether this node runs live captions for the Spaces it originates.
    :param max_negotiations: negotiations (SDP + ICE gathering + session set-up) in
        progress at once; more are refused with RESOURCE_EXHAUSTED and a retry delay, so a
        crowd joining at once cannot starve forwarding.
    """

    node_id: str
    address: str
    endpoint: str = ""
    capacity: int = 2000
    heartbeat_s: float = 1.0
    drain_grace_s: float = 300.0
    levels_interval_s: float = 0.25
    recordings_dir: Path | None = None
    recording_retention_s: float = 30 * 24 * 3600.0
    captions: bool = False
    max_negotiations: int = 32


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a participant connects."""

    node: NodeInfo
    origin: bool


class MediaNode:
    """A media node in the fleet.

    :param engine: the forwarding engine (not started).
    :param registry: the node registry.
    :param grants: verifies media grants.
    :param rooms: where peer states, levels and reconnect requests go.
    :param options: identity and timing.
    :param nodes: calls to other media nodes (relays); ``None``: this node is never an
        edge.
    """

    def __init__(
        self,
        engine: MediaEngine,
        registry: NodeRegistry,
        grants: MediaGrantVerifier,
        rooms: RoomsLink,
        options: NodeOptions,
        nodes: NodeLink | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.grants = grants
        self.rooms = rooms
        self.options = options
        self.draining = False
        self.drain_deadline: float | None = None
        self._changes: list[PeerChange] = []
        self._changes_ready = asyncio.Event()
        self._silent_spaces: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._recorders: dict[str, tuple[SpaceRecorder, dict[str, Any]]] = {}
        self._captions: dict[str, CaptionWorker] = {}
        self._negotiations = Admission(
            options.max_negotiations,
            reason="NEGOTIATIONS_BUSY",
            subject="media node",
            what="negotiations",
        )
        self.nodes = nodes
        self._relays: dict[str, RelayClient] = {}
        self._relay_locks: dict[str, asyncio.Lock] = {}
        self._relay_idle_since: dict[str, float] = {}
        self._next_purge = 0.0
        engine.on_session_state = self._session_state

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.options.node_id

    @property
    def name(self) -> str:
        """This node's resource name, ``mediaNodes/{id}``."""
        return f"mediaNodes/{self.options.node_id}"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, report the node and start the background loops."""
        await self.engine.start()
        await self.registry.report(self.info())
        for loop, label in (
            (self._heartbeat_loop, "heartbeat"),
            (self._control_loop, "control"),
            (self._peer_state_loop, "peer states"),
            (self._levels_loop, "levels"),
        ):
            self._tasks.append(asyncio.create_task(self._forever(loop, label), name=label))
        logger.info("media node %s registered at %s", self.node_id, self.options.address)

    async def stop(self) -> None:
        """Close every session, flush reports and leave the registry."""
        if self._drain_task is not None:
            self._drain_task.cancel()
        for space in list(self._recorders):
            await self._finish_recording(space)
        for space in list(self._captions):
            await self._stop_captions(space)
        for space in list(self._relays):
            await self._close_relay(space)
        await self.engine.close()
        await self._flush_peer_states()
        await stop_tasks(self._tasks)
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.registry.deregister(self.node_id)
        logger.info("media node %s stopped", self.node_id)

    async def _forever(self, loop: Callable[[], Awaitable[None]], label: str) -> None:
        """Run a loop again after an unexpected failure (Redis or rooms briefly away)."""
        while True:
            try:
                await loop()
            except Exception as error:
                reraise_if_cancelling()
                logger.warning("media %s loop failed (%s); restarting in 1 s", label, error)
                await asyncio.sleep(1.0)

    # -- the node's report -----------------------------------------------------------

    def info(self) -> NodeInfo:
        """The node's current report."""
        stats = self.engine.stats()
        return NodeInfo(
            node_id=self.node_id,
            address=self.options.address,
            endpoint=self.options.endpoint,
            draining=self.draining,
            capacity=self.options.capacity,
            publishers=stats.publishers,
            listeners=stats.listeners,
            relays=self._relay_stream_count(),
            report_time=time.time(),
            drain_deadline=self.drain_deadline,
            spaces=tuple(
                SpaceShare(s.space, s.publishers, s.listeners, origin=s.space not in self._relays)
                for s in stats.spaces
            ),
        )

    def _relay_stream_count(self) -> int:
        """Relay streams this node pulls (as an edge) plus those it serves (as an origin)."""
        pulled = sum(relay.stream_count for relay in self._relays.values())
        served = sum(
            len(s.layout.slots)
            for s in self.engine.sessions()
            if s.participant.startswith("relay-")
        )
        RELAY_STREAMS.set(pulled + served)
        return pulled + served

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._close_idle_relays()
            await self.registry.report(self.info())
            await self._recover_dead_nodes()
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + 600.0
                await asyncio.to_thread(self._purge_expired_recordings)
            await asyncio.sleep(self.options.heartbeat_s)

    async def _recover_dead_nodes(self) -> None:
        """Move the participants of nodes whose reports expired (one node does each)."""
        _, dead = await self.registry.nodes()
        for node_id in dead:
            if node_id == self.node_id:
                continue
            if not await self.registry.claim_failover(node_id, self.node_id):
                continue
            peers = await self.registry.peers(node_id)
            logger.warning(
                "media node %s is gone; moving %d participants in %d spaces",
                node_id,
                sum(len(p) for p in peers.values()),
                len(peers),
            )
            for space, participants in peers.items():
                record = await self.registry.space(space)
                if record.closed:
                    continue
                if record.origin == node_id:
                    # Let the next placement pick a new origin: clear it only if unchanged.
                    await self.registry.claim_origin(space, "", replacing=node_id)
                await self._request_reconnect(space, participants, draining=False, source=node_id)
            await self.registry.deregister(node_id)

    async def _request_reconnect(
        self, space: str, participants: Sequence[str], *, draining: bool, source: str
    ) -> None:
        for start in range(0, len(participants), _RECONNECT_CHUNK):
            chunk = participants[start : start + _RECONNECT_CHUNK]
            try:
                await self.rooms.request_reconnect(
                    space, chunk, draining=draining, from_node=source
                )
            except Exception as error:
                reraise_if_cancelling()
                logger.warning("rooms refused to move %d participants: %s", len(chunk), error)

    # -- control channel ---------------------------------------------------------------

    async def _control_loop(self) -> None:
        async for message in self.registry.control_messages():
            await self.apply_control(message)

    async def apply_control(self, message: dict[str, Any]) -> None:
        """Apply a control message (from any node, this one included)."""
        kind = message.get("kind")
        if kind == "drain":
            if message.get("node") == self.node_id:
                grace = message.get("grace")
                await self.drain(float(grace) if grace is not None else None)
            return
        space = str(message.get("space", ""))
        if not self.engine.has_space(space):
            return
        if kind == "permissions":
            permissions = ParticipantPermissions(
                may_publish=bool(message["may_publish"]),
                muted=bool(message["muted"]),
                removed=bool(message["removed"]),
                revision=int(message["revision"]),
            )
            await self._apply_permissions(space, str(message["participant"]), permissions)
        elif kind == "close":
            await self._close_local(space)
        elif kind == "record" and self.engine.participant_count(space):
            await self._start_recording(space)

    async def _apply_permissions(
        self, space: str, participant: str, permissions: ParticipantPermissions
    ) -> None:
        if permissions.removed:
            await self.engine.remove(space, participant)
        else:
            self.engine.update_permissions(
                space,
                participant,
                may_publish=permissions.may_publish,
                muted=permissions.muted,
                revision=permissions.revision,
            )

    # -- placement (any node answers) ---------------------------------------------------

    async def open_space(self, space: str, *, record: bool) -> str:
        """Give the Space an origin (keeping an existing usable one); return its id.

        :raises FailedPrecondition: ``SPACE_CLOSED``.
        :raises Unavailable: ``NO_MEDIA_CAPACITY``.
        """
        nodes, _ = await self.registry.nodes()
        by_id = {node.node_id: node for node in nodes}
        record_now = await self.registry.space(space)
        if record_now.closed:
            raise FailedPrecondition("the space's media was closed", reason="SPACE_CLOSED")
        if record_now.origin and origin_usable(by_id.get(record_now.origin)):
            if record and not record_now.record:
                await self.registry.set_recording(space)
                # The origin starts recording now, not at its next negotiation.
                await self.registry.publish_control({"kind": "record", "space": space})
            return record_now.origin
        return await self._claim_new_origin(space, nodes, record_now.origin, record=record)

    async def _claim_new_origin(
        self,
        space: str,
        nodes: Sequence[NodeInfo],
        previous: str | None,
        *,
        record: bool,
        avoid: str | None = None,
    ) -> str:
        choice = best_node(nodes, avoid=avoid)
        if choice is None:
            raise _no_capacity()
        status, origin = await self.registry.claim_origin(
            space, choice.node_id, replacing=previous, record=record
        )
        if status == "closed":
            raise FailedPrecondition("the space's media was closed", reason="SPACE_CLOSED")
        if status == "set":
            logger.info("space %s: origin is now %s", space, origin)
        return origin

    async def place(
        self, space: str, participant: str, *, may_publish: bool, avoid: str | None
    ) -> Placement:
        """Pick the node a participant connects to.

        :raises FailedPrecondition: ``SPACE_NOT_OPEN``.
        :raises Unavailable: ``NO_MEDIA_CAPACITY``.
        """
        record = await self.registry.space(space)
        if record.closed or record.origin is None and record.open_time is None:
            raise FailedPrecondition(
                "media does not serve this space; open it first", reason="SPACE_NOT_OPEN"
            )
        nodes, _ = await self.registry.nodes()
        by_id = {node.node_id: node for node in nodes}
        origin_id = record.origin
        if origin_id is None or not origin_usable(by_id.get(origin_id), avoid=avoid):
            origin_id = await self._claim_new_origin(
                space, nodes, origin_id, record=record.record, avoid=avoid
            )
        origin = by_id.get(origin_id)
        if origin is None:
            raise _no_capacity()
        # Publishers must reach the origin even when it is full of listeners.
        if may_publish or origin.has_room:
            await self.registry.add_pending(origin.node_id, space, participant)
            return Placement(origin, origin=True)
        edge = best_edge(nodes, space, origin=origin.node_id, avoid=avoid)
        if edge is None:
            raise _no_capacity()
        await self.registry.add_pending(edge.node_id, space, participant)
        return Placement(edge, origin=False)

    # -- sessions (this node) ------------------------------------------------------------

    async def negotiate(
        self, user_id: str, node: str, grant_token: str, offer: str
    ) -> tuple[Negotiation, SpaceRecord]:
        """Verify the grant and open the caller's session; also return the Space's record.

        :raises PermissionDenied: ``GRANT_INVALID``, ``GRANT_EXPIRED``,
            ``GRANT_USER_MISMATCH``, ``GRANT_ALREADY_USED``, ``PARTICIPANT_REMOVED``.
        :raises FailedPrecondition: ``NODE_UNAVAILABLE``, ``SPACE_ENDED``.
        :raises InvalidArgument: ``INVALID_SDP``.
        """
        grant = self.grants.verify(grant_token)
        if grant.user_id != user_id:
            raise PermissionDenied(
                "the media grant was issued to another user", reason="GRANT_USER_MISMATCH"
            )
        if node != self.name or grant.node != self.node_id:
            raise FailedPrecondition(
                "the grant is for another media node; join again for a new placement",
                reason="NODE_UNAVAILABLE",
            )
        if self.draining:
            raise FailedPrecondition(
                "this media node is draining; join again for a new placement",
                reason="NODE_UNAVAILABLE",
            )
        # Admitted before the grant is spent: a refused app retries with the same grant.
        async with self._negotiations.admit():
            record = await self.registry.space(grant.space_id)
            if record.closed:
                raise FailedPrecondition("the space has ended", reason="SPACE_ENDED")
            if record.origin != self.node_id:
                # An edge: listeners only, fed by a relay from the origin.
                if grant.may_publish or record.origin is None:
                    raise FailedPrecondition(
                        "this node does not serve the space; join again for a new placement",
                        reason="NODE_UNAVAILABLE",
                    )
                await self._ensure_relay(grant.space_id, record.origin)
            # A bad offer is refused before the grant is spent, so the app can fix and retry
            # (the layout too: slot lines that disagree on Opus are refused by it).
            Layout.of(parse_offer(offer), self.engine.config.slot_count)
            if not await self.registry.use_grant(grant.nonce, grant.expire_time.timestamp()):
                raise PermissionDenied(
                    "this media grant was already used; join again for a new one",
                    reason="GRANT_ALREADY_USED",
                )
            if record.record and record.origin == self.node_id:
                await self._start_recording(grant.space_id)
            if self.options.captions and record.origin == self.node_id:
                await self._start_captions(grant.space_id, record.open_time or time.time())
            stored = await self.registry.permissions(grant.space_id, user_id)
            if stored is not None:
                await self._apply_permissions(grant.space_id, user_id, stored)
            negotiation = await self.engine.negotiate(
                grant.space_id, user_id, offer, may_publish=grant.may_publish
            )
        return negotiation, record

    def owned_session(self, session_id: str, user_id: str | None) -> Session:
        """A session of this node, checked to belong to ``user_id`` (``None``: a service).

        :raises NotFound: ``SESSION_NOT_FOUND``.
        :raises PermissionDenied: ``NOT_SESSION_OWNER``.
        """
        session = self.engine.session(session_id)
        if session is None:
            raise NotFound("no such media session", reason="SESSION_NOT_FOUND")
        if user_id is not None and session.participant != user_id:
            raise PermissionDenied(
                "the session belongs to another user", reason="NOT_SESSION_OWNER"
            )
        return session

    async def update_permissions(
        self, space: str, participant: str, permissions: ParticipantPermissions
    ) -> tuple[bool, int]:
        """Store and broadcast a participant's permissions; apply them here at once.

        :returns: whether they were applied (not outdated) and the participant's sessions
            on this node.
        :raises FailedPrecondition: ``SPACE_NOT_OPEN``.
        """
        record = await self.registry.space(space)
        if record.closed or record.origin is None and record.open_time is None:
            raise FailedPrecondition("media does not serve this space", reason="SPACE_NOT_OPEN")
        sessions = self.engine.participant_sessions(space, participant)
        applied = await self.registry.set_permissions(space, participant, permissions)
        if applied and self.engine.has_space(space):
            # The control channel brings it here too; applying now makes the 200 ms bound
            # independent of Redis pub/sub latency. A repeat is a no-op (same revision).
            await self._apply_permissions(space, participant, permissions)
        return applied, sessions

    async def close_space(self, space: str) -> int:
        """End the Space's media on every node; returns the sessions closed here."""
        sessions = sum(1 for s in self.engine.sessions() if s.room.space == space)
        await self.registry.close_space(space)
        await self._close_local(space)
        return sessions

    async def _close_local(self, space: str) -> None:
        await self._close_relay(space)
        await self.engine.close_space(space)
        await self._finish_recording(space)
        await self._stop_captions(space)

    def _update_tap(self, space: str) -> None:
        """Hand the Space's forwarded packets to its recorder and caption worker."""
        taps = []
        if space in self._recorders:
            taps.append(self._recorders[space][0].push)
        if space in self._captions:
            taps.append(self._captions[space].push)
        if not taps:
            if self.engine.has_space(space):
                self.engine.set_tap(space, None)
        elif len(taps) == 1:
            self.engine.set_tap(space, taps[0])
        else:

            def both(participant: str, timestamp: int, payload: bytes, received: float) -> None:
                for tap in taps:
                    tap(participant, timestamp, payload, received)

            self.engine.set_tap(space, both)

    # -- captions ------------------------------------------------------------------------

    async def _start_captions(self, space: str, origin_time: float) -> None:
        if space in self._captions:
            return

        async def post(segment: CaptionSegmentData) -> None:
            await self.rooms.post_caption(space, segment)

        worker = CaptionWorker(space, post, asyncio.get_running_loop(), origin_time=origin_time)
        self._captions[space] = worker
        worker.start()
        self._update_tap(space)

    async def _stop_captions(self, space: str) -> None:
        worker = self._captions.pop(space, None)
        if worker is not None:
            self._update_tap(space)
            await asyncio.to_thread(worker.stop)

    # -- recording -----------------------------------------------------------------------

    async def _start_recording(self, space: str) -> None:
        """Record the Space here (its origin) unless this node already does."""
        if space in self._recorders or self.options.recordings_dir is None:
            return
        recording_id = new_id()
        recorder = SpaceRecorder(self.options.recordings_dir / space / f"{recording_id}.ogg")
        item: dict[str, Any] = {
            "id": recording_id,
            "node": self.node_id,
            "create_time": time.time(),
            "state": media_res.Recording.STATE_RECORDING,
        }
        self._recorders[space] = (recorder, item)
        await asyncio.to_thread(recorder.start)
        self._update_tap(space)
        await self.registry.put_recording(space, item)
        logger.info("recording space %s as %s", space, recording_id)

    async def _finish_recording(self, space: str) -> None:
        """Close the Space's file, describe it in the registry and announce it."""
        entry = self._recorders.pop(space, None)
        if entry is None:
            return
        recorder, item = entry
        self._update_tap(space)
        await self.registry.put_recording(
            space, item | {"state": media_res.Recording.STATE_FINALIZING}
        )
        result = await asyncio.to_thread(recorder.stop)
        now = time.time()
        done = item | {
            "state": (
                media_res.Recording.STATE_FAILED
                if result.failed
                else media_res.Recording.STATE_READY
            ),
            "size_bytes": result.size_bytes,
            "duration_s": result.duration_s,
            "ready_time": now,
            "expire_time": now + self.options.recording_retention_s,
        }
        await self.registry.put_recording(space, done)
        message = recording_message(space, done)
        event: media_events.RecordingReadyEvent | media_events.RecordingFailedEvent
        if result.failed:
            event_type = "recording.failed"
            event = media_events.RecordingFailedEvent(recording=message, reason="WRITE_FAILED")
        else:
            event_type = "recording.ready"
            event = media_events.RecordingReadyEvent(recording=message)
        event.event_time.FromSeconds(int(now))
        await publish_event(
            self.registry.redis,
            "media",
            event_type,
            message.name,
            event,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{message.name}/{event_type}")),
        )
        logger.info(
            "recording %s of space %s is %s: %.1f s, %d bytes",
            item["id"],
            space,
            event_type.split(".")[1],
            result.duration_s,
            result.size_bytes,
        )

    def _purge_expired_recordings(self) -> None:
        """Delete recording files older than the retention (runs on a thread)."""
        folder = self.options.recordings_dir
        if folder is None or not folder.exists():
            return
        cutoff = time.time() - self.options.recording_retention_s
        for path in folder.glob("*/*.ogg"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.info("deleted expired recording %s", path)
            except OSError as error:
                logger.warning("could not purge %s: %s", path, error)

    # -- relays ------------------------------------------------------------------------

    async def open_relay(self, space: str, edge_node: str, sdp_offer: str) -> Negotiation:
        """Serve an edge's relay of a Space this node originates (OpenRelay).

        :raises FailedPrecondition: ``NOT_ORIGIN``, ``SPACE_NOT_OPEN``.
        """
        record = await self.registry.space(space)
        if record.closed or record.origin is None:
            raise FailedPrecondition("media does not serve this space", reason="SPACE_NOT_OPEN")
        if record.origin != self.node_id:
            raise FailedPrecondition("this node is not the space's origin", reason="NOT_ORIGIN")
        # The relay is one more listener of the origin (one per edge: a new one replaces it).
        return await self.engine.negotiate(
            space, f"relay-{edge_node}", sdp_offer, may_publish=False
        )

    async def close_served_relay(self, space: str, relay: str) -> None:
        """Close a relay this node serves (CloseRelay); closing a closed one succeeds."""
        session = self.engine.session(relay)
        if session is not None and session.room.space == space:
            await self.engine.leave(relay)

    async def _ensure_relay(self, space: str, origin_id: str) -> None:
        """Pull the Space from its origin unless this node already does."""
        lock = self._relay_locks.setdefault(space, asyncio.Lock())
        async with lock:
            relay = self._relays.get(space)
            if relay is not None and relay.origin == origin_id:
                return
            if relay is not None:
                await self._close_relay(space)
            origin = await self.registry.node(origin_id)
            if origin is None or self.nodes is None:
                raise FailedPrecondition(
                    "the space's origin is unreachable; join again for a new placement",
                    reason="NODE_UNAVAILABLE",
                )
            relay = RelayClient(
                self.engine.room(space),
                self.engine.config.slot_count,
                lambda: self._relay_lost(space),
            )
            nodes = self.nodes

            async def offer(sdp: str) -> tuple[str, str]:
                return await nodes.open_relay(origin.address, space, self.node_id, sdp)

            try:
                await relay.open(origin_id, offer)
            except BaseException:
                await relay.close()
                raise
            self._relays[space] = relay
            self._relay_idle_since.pop(space, None)

    def _relay_lost(self, space: str) -> None:
        """The origin went away or closed the relay: pull again from the current origin."""
        if self._relays.get(space) is None:
            return
        logger.warning("relay of space %s lost; reopening", space)
        self._relays.pop(space, None)
        task = asyncio.get_running_loop().create_task(self._reopen_relay(space))
        task.add_done_callback(_log_failure)

    async def _reopen_relay(self, space: str) -> None:
        for delay in (0.2, 0.5, 1.0, 2.0, 4.0, 8.0):
            await asyncio.sleep(delay)
            if not self.engine.participant_count(space):
                return
            record = await self.registry.space(space)
            if record.closed or record.origin == self.node_id:
                return
            if record.origin is None:
                continue
            origin = await self.registry.node(record.origin)
            if origin is None or origin.draining:
                continue
            try:
                await self._ensure_relay(space, record.origin)
                return
            except Exception as error:
                reraise_if_cancelling()
                logger.warning("reopening the relay of %s failed: %s", space, error)

    async def _close_relay(self, space: str) -> None:
        relay = self._relays.pop(space, None)
        if relay is None:
            return
        await relay.close()
        origin = await self.registry.node(relay.origin)
        if origin is not None and self.nodes is not None and relay.relay_id:
            try:
                await self.nodes.close_relay(origin.address, space, relay.relay_id)
            except Exception as error:
                reraise_if_cancelling()
                logger.info("closing relay %s on %s: %s", relay.relay_id, relay.origin, error)

    async def _close_idle_relays(self, idle_s: float = 10.0) -> None:
        """Release relays of Spaces this node has had no listener of for ``idle_s``."""
        now = time.monotonic()
        for space in list(self._relays):
            if self.engine.participant_count(space):
                self._relay_idle_since.pop(space, None)
            elif now - self._relay_idle_since.setdefault(space, now) >= idle_s:
                self._relay_idle_since.pop(space, None)
                await self._close_relay(space)

    # -- drain -------------------------------------------------------------------------

    async def drain(self, grace_s: float | None = None) -> None:
        """Start draining (idempotent: a second call keeps the earlier deadline)."""
        if self.draining:
            return
        grace = self.options.drain_grace_s if grace_s is None else grace_s
        self.draining = True
        self.drain_deadline = time.time() + grace
        await self.registry.report(self.info())
        logger.info("media node %s draining for up to %.0f s", self.node_id, grace)
        self._drain_task = asyncio.create_task(self._drain(grace), name="drain")

    async def _drain(self, grace: float) -> None:
        sessions = self.engine.sessions()
        by_space: dict[str, list[str]] = {}
        for session in sessions:
            by_space.setdefault(session.room.space, []).append(session.participant)
        # Spread the moves over the first half of the grace period so reconnects do not
        # stampede the next node.
        batches = [
            (space, participants[i : i + _RECONNECT_CHUNK])
            for space, participants in by_space.items()
            for i in range(0, len(participants), _RECONNECT_CHUNK)
        ]
        pause = grace / 2 / len(batches) if batches else 0.0
        for space, participants in batches:
            await self._request_reconnect(space, participants, draining=True, source=self.node_id)
            await asyncio.sleep(min(pause, 5.0))
        deadline = self.drain_deadline or time.time()
        while self.engine.sessions() and time.time() < deadline:
            await asyncio.sleep(0.2)
        self._drained.set()

    async def wait_drained(self) -> None:
        """Return once every session has gone or the grace period has ended."""
        if self._drain_task is None:
            return
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain_task

    # -- reports to rooms --------------------------------------------------------------

    def _session_state(self, session: Session, connected: bool) -> None:
        if session.participant.startswith("relay-"):
            return  # an edge node's relay, not a participant: rooms does not know it
        self._changes.append(
            PeerChange(session.room.space, session.participant, session.id, connected, time.time())
        )
        self._changes_ready.set()
        task = asyncio.get_running_loop().create_task(
            self._record_peer(session.room.space, session.participant, session.id, connected)
        )
        task.add_done_callback(_log_failure)

    async def _record_peer(
        self, space: str, participant: str, session_id: str, connected: bool
    ) -> None:
        """Update the registry: the peer, and the node's load at once (a connected peer
        stops counting as pending, so the report must count it as connected now)."""
        if connected:
            await self.registry.peer_connected(self.node_id, space, participant, session_id)
            await self.registry.report(self.info())
        else:
            await self.registry.peer_closed(self.node_id, space, participant, session_id)

    async def _peer_state_loop(self) -> None:
        while True:
            await self._changes_ready.wait()
            # Gather what arrives in the next 100 ms into one report.
            await asyncio.sleep(0.1)
            await self._flush_peer_states()

    async def _flush_peer_states(self) -> None:
        self._changes_ready.clear()
        while self._changes:
            batch, self._changes = self._changes[:1000], self._changes[1000:]
            try:
                await self.rooms.report_peer_states(self.name, batch)
            except Exception as error:
                reraise_if_cancelling()
                logger.warning("peer states not reported (%s); retrying", error)
                self._changes = batch + self._changes
                self._changes = self._changes[-10_000:]
                self._changes_ready.set()
                return

    async def _levels_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.levels_interval_s)
            spaces = {s.room.space for s in self.engine.sessions()} | self._silent_spaces
            for space in spaces - self._relays.keys():
                levels = self.engine.levels(space)
                if not levels and space in self._silent_spaces:
                    continue
                if levels:
                    self._silent_spaces.discard(space)
                else:
                    self._silent_spaces.add(space)
                await self.rooms.report_levels(space, levels, time.time())
            self._silent_spaces = {s for s in self._silent_spaces if self.engine.has_space(s)}


def _no_capacity() -> Unavailable:
    return Unavailable(
        "no media node has room; retry later",
        reason="NO_MEDIA_CAPACITY",
        retry_after=_NO_CAPACITY_RETRY_S,
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("registry update failed: %s", task.exception())

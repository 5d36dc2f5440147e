"""The media engine: the API the gRPC layer of the media service calls.

::

    engine = MediaEngine(MediaConfig(host="10.0.0.5", port=3478))
    await engine.start()
    result = await engine.negotiate("space-1", "alice", offer_sdp, may_publish=True)
    # ... send result.sdp_answer to the app; ICE and DTLS follow on the mux port.
    engine.update_permissions("space-1", "bob", may_publish=False, muted=False)
    await engine.remove("space-1", "carol")
    engine.levels("space-1")            # [SpeakerLevel(...)], loudest first
    async for levels in engine.watch_levels("space-1"): ...
    engine.stats()                      # node load for GetNodeStats / placement
    await engine.close()

Permission changes take effect synchronously: the call returns after the room has already
stopped (or started) forwarding. Every method must be called on the engine's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from services.media import aiortc_internals as internals
from services.media.collector import CollectorPolicy
from services.media.config import MediaConfig
from services.media.egress import EgressPool
from services.media.icemux import IceMux
from services.media.levels import SpeakerLevel
from services.media.metrics import PEERS
from services.media.peer import Layout
from services.media.room import Room
from services.media.sdp import parse_offer
from services.media.session import Session, SessionState

logger = logging.getLogger(__name__)

__all__ = ["EngineStats", "MediaEngine", "Negotiation", "SpaceStats"]

_RTCP_CHECK = 0.1
"""How often due RTCP reports go out. Often, so each round is short: a round builds every
report that fell due since the last one on the event loop (a thousand listeners' reports
every 0.25 s held ingress for several milliseconds, the forwarding latency's p99)."""


@dataclasses.dataclass(frozen=True)
class Negotiation:
    """The result of :meth:`MediaEngine.negotiate`.

    :param session: the new session's id.
    :param sdp_answer: media's answer, with all of its ICE candidates.
    :param slot_count: how many listening slots the session has.
    :param may_publish: whether the participant may publish now.
    """

    session: str
    sdp_answer: str
    slot_count: int
    may_publish: bool


@dataclasses.dataclass(frozen=True)
class SpaceStats:
    """Load of one Space on this node."""

    space: str
    publishers: int
    listeners: int


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Load of the node (connected sessions)."""

    publishers: int
    listeners: int
    sessions: int
    spaces: tuple[SpaceStats, ...]
    egress_threads: int
    address: tuple[str, int]


class MediaEngine:
    """Forwarding of one media node.

    :param config: settings; the defaults bind the ICE mux to 127.0.0.1.
    """

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        self.on_session_state: Callable[[Session, bool], None] | None = None
        """Called with ``(session, True)`` once a session forwards and ``(session, False)``
        once it has closed (a session that never connected is reported closed only)."""
        self.mux = IceMux(
            self.config.host,
            self.config.port,
            self.config.announce,
            consent_plane=self.config.consent_plane,
        )
        self.pool: EgressPool | None = None
        self._rooms: dict[str, Room] = {}
        self._ended: set[str] = set()
        self._sessions: dict[str, Session] = {}
        self._group_ids = itertools.count(1)
        self._watchers: dict[str, set[asyncio.Queue[list[SpeakerLevel]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._switch_interval: float | None = None
        self.collector = CollectorPolicy(
            enabled=self.config.gc_freeze,
            unfreeze_after_closed=self.config.gc_unfreeze_after_closed,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the ICE mux and start the egress workers and housekeeping."""
        # A vanished peer is noticed by its last consent check, at most
        # CONSENT_FAILURES x 1.2 x interval after it went (RFC 7675: within 30 s).
        internals.set_consent_interval(
            self.config.consent_timeout / internals.CONSENT_FAILURES / 1.2
        )
        await self.mux.start()
        if self.config.egress_threads and self.config.switch_interval is not None:
            if sys.getswitchinterval() > self.config.switch_interval:
                self._switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(self.config.switch_interval)
        self.pool = EgressPool(
            self.config.egress_threads,
            self.config.egress_chunk,
            self.config.egress_split,
            self.mux.send_sockets,
        )
        self._task = asyncio.create_task(self._housekeeping(), name="media-housekeeping")

    async def close(self) -> None:
        """Close every session and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for space in list(self._rooms):
            await self._close_room(space)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        self.collector.close()
        self.mux.close()

    async def __aenter__(self) -> MediaEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        """The (announced address, port) of the ICE mux."""
        return self.mux.announce, self.mux.port

    # -- sessions ----------------------------------------------------------------------

    def _room(self, space: str) -> Room:
        room = self._rooms.get(space)
        if room is None:
            if self.pool is None:
                raise RuntimeError("start() the engine first")
            room = Room(
                space,
                self.config,
                self.mux,
                self.pool,
                lambda: next(self._group_ids),
                self._forget,
                self._update_peers,
            )
            self._rooms[space] = room
        return room

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        self.collector.closed()
        if self.on_session_state is not None:
            self.on_session_state(session, False)

    def _report_connected(self, session: Session, connected: asyncio.Future[None]) -> None:
        if not connected.cancelled() and connected.exception() is None:
            if self.on_session_state is not None:
                self.on_session_state(session, True)

    def set_tap(self, space: str, tap: Callable[[str, int, bytes, float], None] | None) -> None:
        """Hand every packet forwarded in the Space to ``tap`` (``None`` stops it); see
        :attr:`services.media.room.Room.tap`."""
        self._room(space).tap = tap

    def room(self, space: str) -> Room:
        """The Space's room on this node (created when missing)."""
        return self._room(space)

    def has_space(self, space: str) -> bool:
        """Whether this node holds media of the Space (sessions or permissions)."""
        return space in self._rooms

    def session(self, session_id: str) -> Session | None:
        """A live (or connecting) session by id."""
        return self._sessions.get(session_id)

    def participant_sessions(self, space: str, participant: str) -> int:
        """How many sessions (live or connecting) a participant has here."""
        room = self._rooms.get(space)
        if room is None:
            return 0
        return sum(1 for s in room.sessions.values() if s.participant == participant)

    def participant_count(self, space: str) -> int:
        """Sessions (live or connecting) of the Space on this node."""
        room = self._rooms.get(space)
        return len(room.sessions) if room is not None else 0

    def sessions(self) -> list[Session]:
        """Every session on the node."""
        return list(self._sessions.values())

    def _session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no media session {session_id}", reason="SESSION_NOT_FOUND")
        return session

    async def negotiate(
        self, space: str, participant: str, sdp_offer: str, *, may_publish: bool
    ) -> Negotiation:
        """Open a participant's session from their SDP offer.

        :param may_publish: what the participant's grant says; permissions set later by
            :meth:`update_permissions` win over it.
        :raises InvalidArgument: (``INVALID_SDP``) for an unusable offer.
        :raises PermissionDenied: (``PARTICIPANT_REMOVED``) for a removed participant.
        :raises FailedPrecondition: (``SPACE_ENDED``) for a closed Space.
        """
        if space in self._ended:
            raise FailedPrecondition(f"space {space} has ended", reason="SPACE_ENDED")
        offer = parse_offer(sdp_offer)
        layout = Layout.of(offer, self.config.slot_count)
        room = self._room(space)
        permissions = room.permissions_for(participant, may_publish)
        if permissions.removed:
            raise PermissionDenied(
                "the participant was removed from the space", reason="PARTICIPANT_REMOVED"
            )
        session_id = secrets.token_hex(8)
        session = Session(session_id, room, participant, layout, permissions)
        room.sessions[session_id] = session
        self._sessions[session_id] = session
        self.collector.opened()
        session.connected.add_done_callback(lambda future: self._report_connected(session, future))
        try:
            answer = await session.peer.answer(sdp_offer)
        except BaseException:
            await room.close_session(session, reason="negotiation failed")
            raise
        logger.info(
            "media session %s for %s in %s: %d slots, publish line %s",
            session_id,
            participant,
            space,
            len(layout.slots),
            layout.publish.mid if layout.publish else None,
        )
        return Negotiation(session_id, answer, len(layout.slots), permissions.may_publish)

    async def wait_connected(self, session_id: str, timeout: float = 10.0) -> None:
        """Wait until the session's DTLS is up and it forwards.

        :raises TimeoutError: when it does not connect in time.
        :raises ConnectionError: when it closed first.
        """
        await asyncio.wait_for(asyncio.shield(self._session(session_id).connected), timeout)

    async def add_ice_candidate(
        self,
        session_id: str,
        candidate: str,
        sdp_mid: str | None = None,
        sdp_mline_index: int | None = None,
    ) -> None:
        """Add an app's trickled candidate (empty ``candidate``: end of candidates)."""
        await self._session(session_id).peer.add_ice_candidate(candidate, sdp_mid, sdp_mline_index)

    async def restart_ice(self, session_id: str, sdp_offer: str) -> str:
        """Restart a session's ICE with the app's new offer (same session, slots and
        permissions); return media's answer with new ICE credentials.

        :raises NotFound: (``SESSION_NOT_FOUND``) for an unknown or closed session.
        :raises InvalidArgument: (``INVALID_SDP``) for an offer that does not parse or
            changes the session's m-lines or DTLS fingerprint.
        """
        session = self._session(session_id)
        if session.state is SessionState.CLOSED:
            raise NotFound(f"media session {session_id} has closed", reason="SESSION_NOT_FOUND")
        answer = await session.peer.restart_ice(sdp_offer)
        logger.info("media session %s restarted ICE", session_id)
        return answer

    async def leave(self, session_id: str) -> None:
        """Close a session; closing one already closed succeeds."""
        session = self._sessions.get(session_id)
        if session is not None:
            await session.room.close_session(session, reason="left")

    # -- control -----------------------------------------------------------------------

    def update_permissions(
        self,
        space: str,
        participant: str,
        *,
        may_publish: bool,
        muted: bool = False,
        revision: int | None = None,
    ) -> bool:
        """Apply a participant's permissions at once (also before they connect).

        :param revision: rooms' revision of the permissions; an update older than the one
            applied is ignored.
        :returns: ``False`` when the update was ignored as outdated.
        """
        return self._room(space).update_permissions(participant, may_publish, muted, revision)

    async def remove(self, space: str, participant: str) -> None:
        """Remove a participant: forwarding from and to them stops before this returns
        its first await, their session closes, and they cannot negotiate again."""
        room = self._room(space)
        for session in room.remove(participant):
            await room.close_session(session, reason="removed")

    async def close_space(self, space: str) -> None:
        """End a Space's media: close all its sessions; later negotiations fail."""
        self._ended.add(space)
        await self._close_room(space)

    async def _close_room(self, space: str) -> None:
        room = self._rooms.pop(space, None)
        if room is None:
            return
        room.closed = True
        for session in list(room.sessions.values()):
            await room.close_session(session, reason="space closed")
        for queue in self._watchers.pop(space, set()):
            queue.put_nowait([])
        self._update_peers()

    # -- observation -------------------------------------------------------------------

    def levels(self, space: str) -> list[SpeakerLevel]:
        """Every publisher's current level in a Space, loudest first."""
        room = self._rooms.get(space)
        return room.levels(time.perf_counter()) if room is not None else []

    async def watch_levels(self, space: str) -> AsyncIterator[list[SpeakerLevel]]:
        """Level snapshots of a Space every ``levels_interval`` seconds (the latest one
        only, if the consumer is slow); ends when the Space closes."""
        queue: asyncio.Queue[list[SpeakerLevel]] = asyncio.Queue(maxsize=1)
        self._watchers.setdefault(space, set()).add(queue)
        try:
            while True:
                levels = await queue.get()
                if space not in self._rooms:
                    return
                yield levels
        finally:
            watchers = self._watchers.get(space)
            if watchers is not None:
                watchers.discard(queue)

    def slot_speakers(self, space: str, participant: str) -> list[str | None]:
        """Who each of a participant's slots carries now (``None``: an empty slot)."""
        room = self._rooms.get(space)
        return room.slot_speakers(participant) if room is not None else []

    def stats(self) -> EngineStats:
        """Connected sessions of the node, by role and by Space."""
        spaces = []
        for space, room in self._rooms.items():
            publishers, listeners = room.peer_counts()
            if publishers or listeners:
                spaces.append(SpaceStats(space, publishers, listeners))
        return EngineStats(
            publishers=sum(s.publishers for s in spaces),
            listeners=sum(s.listeners for s in spaces),
            sessions=len(self._sessions),
            spaces=tuple(spaces),
            egress_threads=self.config.egress_threads,
            address=self.address,
        )

    async def flush(self) -> None:
        """Wait until the egress workers have served everything queued so far."""
        if self.pool is not None:
            await self.pool.flush()

    def _update_peers(self) -> None:
        publishers = listeners = 0
        for room in self._rooms.values():
            p, listening = room.peer_counts()
            publishers += p
            listeners += listening
        PEERS.labels("publisher").set(publishers)
        PEERS.labels("listener").set(listeners)

    async def _housekeeping(self) -> None:
        interval = min(self.config.selection_interval, _RTCP_CHECK)
        next_rtcp = next_levels = 0.0
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            try:
                for room in list(self._rooms.values()):
                    room.reselect(now)
                if now >= next_rtcp:
                    next_rtcp = now + _RTCP_CHECK
                    for room in list(self._rooms.values()):
                        # In slices: media packets waiting on the loop go first.
                        while room.send_reports(now):
                            await asyncio.sleep(0)
                if now >= next_levels and self._watchers:
                    next_levels = now + self.config.levels_interval
                    self._publish_levels(now)
                self.collector.tick()
            except Exception:
                logger.exception("media housekeeping failed")

    def _publish_levels(self, now: float) -> None:
        for space, queues in self._watchers.items():
            room = self._rooms.get(space)
            if room is None:
                continue
            levels = room.levels(now)
            for queue in queues:
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(levels)

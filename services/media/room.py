"""One Space on this node: its sessions, permissions, forwarding groups and speakers.

The room decides who is heard: every ``selection_interval`` (and at once on a permission
change, a departure, or a new speaker's first packet) it ranks the eligible publishers by
smoothed level and lets every forwarding group bring its lanes in line
(:meth:`ForwardingGroup.assign`). Forwarding itself is :meth:`Room.forward`: one parse per
publisher packet, one rewrite per group whose lanes carry the publisher, one hand-off of
the rewritten packet to the egress workers per group.

Groups: pure listeners share one group per Opus payload type; a participant who may
publish gets a private group (a clone of the listeners' group, so moving into it is
seamless) that leaves them out. A participant who stops being allowed to publish keeps
their private group, which keeps their streams continuous.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable

from services.media.config import MediaConfig
from services.media.egress import EgressHandle, EgressPool, FallbackSender
from services.media.forwarding import ForwardingGroup
from services.media.icemux import IceMux
from services.media.ingress import Publisher
from services.media.levels import LevelMeter, SpeakerLevel
from services.media.metrics import PACKETS_DROPPED, SLOT_SWITCHES, DropReason
from services.media.rtcp import compound_report, read_reports
from services.media.session import Permissions, Session, SessionState

logger = logging.getLogger(__name__)

__all__ = ["Room"]

_RESELECT_MIN_GAP = 0.02
_SILENT = LevelMeter()


class Room:
    """The media of one Space on this node.

    :param space: the Space's id.
    :param config: engine settings.
    :param mux: the node's ICE mux.
    :param pool: the node's egress workers.
    :param next_group_id: allocator of engine-wide group ids.
    :param on_session_closed: called when a session of the room is gone.
    :param on_peers_changed: called when a session connects, leaves or changes role.
    """

    def __init__(
        self,
        space: str,
        config: MediaConfig,
        mux: IceMux,
        pool: EgressPool,
        next_group_id: Callable[[], int],
        on_session_closed: Callable[[Session], None],
        on_peers_changed: Callable[[], None],
    ) -> None:
        self.space = space
        self.config = config
        self.mux = mux
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self._rng = random.Random()
        self._next_group_id = next_group_id
        self._on_session_closed = on_session_closed
        self._count_peers = on_peers_changed
        ssrcs: set[int] = set()
        while len(ssrcs) < config.max_slots:
            ssrcs.add(self._rng.randrange(1, 1 << 32))
        self.slot_ssrcs = tuple(sorted(ssrcs, key=lambda _: self._rng.random()))
        self.permissions: dict[str, Permissions] = {}
        self._feeds: dict[str, Publisher] = {}
        self.sessions: dict[str, Session] = {}
        self.live: dict[str, Session] = {}
        self._audience: dict[int, ForwardingGroup] = {}
        self._private: dict[str, ForwardingGroup] = {}
        self._members: dict[int, dict[str, Session]] = {}
        self._fallbacks: dict[int, dict[str, FallbackSender]] = {}
        self._publishers: dict[str, Publisher] = {}
        self._last_reselect = 0.0
        # (when, tie-breaker, session): the next RTCP report of each live session, so a
        # round touches only the sessions that are due (not a thousand each 0.1 s).
        self._rtcp_due: list[tuple[float, int, Session]] = []
        self._rtcp_order = itertools.count()
        self.closed = False
        self.tap: Callable[[str, int, bytes, float], None] | None = None
        """Gets ``(participant, rtp_timestamp, opus_payload, received)`` of every packet
        forwarded (the recorder of a recorded Space)."""

    # -- permissions ------------------------------------------------------------------

    def permissions_for(self, participant: str, grant_may_publish: bool) -> Permissions:
        """The participant's permissions; a grant only sets them the first time, so an
        older grant cannot restore a revoked right."""
        permissions = self.permissions.get(participant)
        if permissions is None:
            permissions = self.permissions[participant] = Permissions(grant_may_publish)
        return permissions

    def update_permissions(
        self, participant: str, may_publish: bool, muted: bool, revision: int | None
    ) -> bool:
        """Apply new permissions at once; returns ``False`` for an outdated revision."""
        permissions = self.permissions.get(participant)
        if permissions is None:
            permissions = self.permissions[participant] = Permissions(may_publish, muted)
        elif revision is not None and revision < permissions.revision:
            return False
        was_publisher = permissions.may_publish
        permissions.may_publish = may_publish
        permissions.muted = muted
        if revision is not None:
            permissions.revision = revision
        session = self.live.get(participant)
        if session is not None and session.state is SessionState.CONNECTED:
            if may_publish and session.publisher is not None:
                self._move(session, self._private_group(session))
            if was_publisher != may_publish:
                self._count_peers()
        self.reselect(time.perf_counter())
        return True

    def remove(self, participant: str) -> list[Session]:
        """Mark the participant removed and stop forwarding from and to them now; returns
        their sessions (live or still connecting) for the caller to close."""
        permissions = self.permissions.setdefault(participant, Permissions(False))
        permissions.removed = True
        sessions = [s for s in self.sessions.values() if s.participant == participant]
        for session in sessions:
            self.detach(session)
        return sessions

    # -- sessions ---------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Start forwarding for a session whose DTLS is up."""
        if session.permissions.removed or self.closed:
            session.mark_closed()
            self.loop.create_task(self.close_session(session, reason="not admitted"))
            return
        previous = self.live.get(session.participant)
        self.live[session.participant] = session
        if previous is not None and previous is not session:
            self.detach(previous)
            self.loop.create_task(self.close_session(previous, reason="replaced"))
        if session.egress is not None:
            self.pool.attach(session.egress)
        if session.layout.slots:
            if session.permissions.may_publish and session.publisher is not None:
                group = self._private_group(session)
            else:
                group = self._audience_group(session.layout.slot_payload_type)
            self._join(session, group)
        if session.publisher is not None:
            self._publishers[session.id] = session.publisher
        session.next_rtcp = time.perf_counter() + self.config.rtcp_interval * self._rng.random()
        heapq.heappush(self._rtcp_due, (session.next_rtcp, next(self._rtcp_order), session))
        self._count_peers()
        self.reselect(time.perf_counter())
        self._retarget()

    def detach(self, session: Session) -> None:
        """Stop forwarding for a session (idempotent)."""
        if session.state is SessionState.CLOSED:
            return
        was_connected = session.state is SessionState.CONNECTED
        session.mark_closed()
        if self.live.get(session.participant) is session:
            del self.live[session.participant]
        if session.group is not None:
            self._leave(session, session.group)
            private = self._private.get(session.id)
            if private is not None:
                del self._private[session.id]
            session.group = None
        if session.egress is not None and was_connected:
            self.pool.detach(session.egress)
        self._publishers.pop(session.id, None)
        if was_connected:
            self._count_peers()
        self.reselect(time.perf_counter())
        self._retarget()

    async def close_session(self, session: Session, reason: str) -> None:
        """Detach and close a session's peer connection."""
        logger.info("closing media session %s (%s)", session.id, reason)
        self.detach(session)
        self.sessions.pop(session.id, None)
        if session.fallback is not None:
            await session.fallback.close()
        await session.peer.close()
        self._on_session_closed(session)

    def _audience_group(self, payload_type: int) -> ForwardingGroup:
        group = self._audience.get(payload_type)
        if group is None:
            group = ForwardingGroup(
                self._next_group_id(),
                payload_type,
                self.slot_ssrcs[: self.config.slot_count],
                rng=self._rng,
            )
            self._audience[payload_type] = group
            self.reselect_group(group)
        return group

    def _private_group(self, session: Session) -> ForwardingGroup:
        group = self._private.get(session.id)
        if group is None:
            base = self._audience_group(session.layout.slot_payload_type)
            group = base.clone(self._next_group_id(), excluded=session.participant)
            self._private[session.id] = group
        return group

    def _join(self, session: Session, group: ForwardingGroup) -> None:
        session.group = group
        self._members.setdefault(group.group_id, {})[session.id] = session
        if session.egress is not None:
            self.pool.join(group.group_id, session.egress)
        elif session.fallback is not None:
            self._fallbacks.setdefault(group.group_id, {})[session.id] = session.fallback

    def _leave(self, session: Session, group: ForwardingGroup) -> None:
        members = self._members.get(group.group_id)
        if members is not None:
            members.pop(session.id, None)
            if not members:
                del self._members[group.group_id]
        if session.egress is not None:
            self.pool.leave(group.group_id, session.egress)
        fallbacks = self._fallbacks.get(group.group_id)
        if fallbacks is not None:
            fallbacks.pop(session.id, None)
            if not fallbacks:
                del self._fallbacks[group.group_id]

    def _move(self, session: Session, group: ForwardingGroup) -> None:
        if session.group is group or not session.layout.slots:
            return
        if session.group is not None:
            self._leave(session, session.group)
        self._join(session, group)
        self._retarget()

    def peer_counts(self) -> tuple[int, int]:
        """``(publishers, listeners)`` among connected sessions."""
        publishers = listeners = 0
        for session in self.live.values():
            if session.state is SessionState.CONNECTED:
                if session.permissions.may_publish:
                    publishers += 1
                else:
                    listeners += 1
        return publishers, listeners

    # -- forwarding -------------------------------------------------------------------

    def forward(self, session: Session, packet: bytes, received: float) -> None:
        """Forward one unprotected RTP packet of a publisher that may publish."""
        publisher = session.publisher
        if publisher is None:
            return
        self._forward(publisher, packet, received)

    # -- relay feeds (an edge node's copy of the origin's speakers) ----------------------

    def add_feed(self, feed: str, payload_type: int) -> None:
        """Take a relay stream from the origin as one more publisher of this room.

        On an edge node each stream of a relay (one origin slot: whoever the origin
        forwards in it) is a feed; the edge's listeners get the feeds like speakers.
        Feeds carry no audio level, so they rank equally; a relay has as many streams as
        listeners have slots, so every feed is forwarded.
        """
        if feed not in self._feeds:
            self._feeds[feed] = Publisher(feed, payload_type, None, time.perf_counter())
            self._publishers[f"feed:{feed}"] = self._feeds[feed]
            self.reselect(time.perf_counter())

    def remove_feeds(self) -> None:
        """Drop every feed (the relay closed)."""
        for feed in self._feeds:
            self._publishers.pop(f"feed:{feed}", None)
        self._feeds.clear()
        self.reselect(time.perf_counter())

    def forward_feed(self, feed: str, packet: bytes, received: float) -> None:
        """Forward one unprotected RTP packet of a relay stream."""
        publisher = self._feeds.get(feed)
        if publisher is not None:
            self._forward(publisher, packet, received)

    def _forward(self, publisher: Publisher, packet: bytes, received: float) -> None:
        parsed = publisher.ingest(packet, received)
        if parsed is None:
            return
        if not publisher.targets:
            if received - self._last_reselect < _RESELECT_MIN_GAP:
                return
            self.reselect(received)
            if not publisher.targets:
                return
        marker, ssrc, seq, timestamp, payload = parsed
        if self.tap is not None:
            self.tap(publisher.participant, timestamp, bytes(payload), received)
        fanout = self.pool.fanout
        for group, lane in publisher.targets:
            rewritten = group.rewrite(lane, marker, ssrc, seq, timestamp, payload, received)
            if rewritten is None:
                PACKETS_DROPPED.labels(DropReason.STALE).inc()
                continue
            fanout(group.group_id, rewritten, received)
            fallbacks = self._fallbacks.get(group.group_id)
            if fallbacks:
                for sender in fallbacks.values():
                    sender.push(rewritten, received)

    def _groups(self) -> list[ForwardingGroup]:
        return [*self._audience.values(), *self._private.values()]

    def _ranking(self, now: float) -> list[tuple[str, float]]:
        ranked: list[tuple[str, float]] = []
        timeout = self.config.active_timeout
        for session_id, publisher in self._publishers.items():
            if publisher.participant not in self._feeds:
                session = self.sessions.get(session_id)
                if session is None or not session.permissions.forwards:
                    continue
            meter = publisher.meter
            loudness = meter.loudness if meter.active(now, timeout) else 0.0
            ranked.append((publisher.participant, loudness))
        ranked.sort(key=lambda item: -item[1])
        return ranked

    def reselect(self, now: float) -> None:
        """Re-rank the publishers and update every group's lanes."""
        self._last_reselect = now
        ranked = self._ranking(now)
        changed = False
        for group in self._groups():
            changes = group.assign(ranked, self.config.switch_margin_db)
            if changes:
                changed = True
                SLOT_SWITCHES.inc(sum(1 for _, _, new in changes if new is not None))
        if changed:
            self._retarget()

    def reselect_group(self, group: ForwardingGroup) -> None:
        """Fill a new group's lanes from the current ranking."""
        if group.assign(self._ranking(time.perf_counter()), self.config.switch_margin_db):
            self._retarget()

    def _retarget(self) -> None:
        by_participant = {p.participant: p for p in self._publishers.values()}
        for publisher in by_participant.values():
            publisher.targets = []
        for group in self._groups():
            if group.group_id not in self._members:
                continue  # nobody listens: no point rewriting for it
            for lane in group.lanes:
                if lane.speaker is not None:
                    target = by_participant.get(lane.speaker)
                    if target is not None:
                        target.targets.append((group, lane))

    # -- RTCP and levels ----------------------------------------------------------------

    def read_rtcp(self, session: Session, packet: bytes) -> None:
        """Handle an RTCP packet from a session."""
        stats = session.publisher.stats if session.publisher is not None else None
        read_reports(packet, session.slot_ssrcs, stats, time.perf_counter())

    def send_reports(self, now: float, limit: int = 8) -> bool:
        """Send up to ``limit`` of the RTCP reports that are due; returns whether more
        are (the caller yields to ingress between slices)."""
        interval = self.config.rtcp_interval
        due = self._rtcp_due
        batch: list[tuple[EgressHandle, bytes]] = []
        more = False
        while due and due[0][0] <= now:
            if limit <= 0:
                more = True
                break
            when, _, session = heapq.heappop(due)
            if (
                session.state is not SessionState.CONNECTED
                or self.live.get(session.participant) is not session
                or when != session.next_rtcp
            ):
                continue  # gone, replaced, or rescheduled since
            session.next_rtcp = now + interval * (0.5 + self._rng.random())
            heapq.heappush(due, (session.next_rtcp, next(self._rtcp_order), session))
            lanes = session.group.lanes[: len(session.layout.slots)] if session.group else []
            stats = session.publisher.stats if session.publisher is not None else None
            report = compound_report(
                lanes, session.peer.cname, session.peer.receiver_ssrc, stats, now
            )
            if report is None:
                continue
            limit -= 1
            if session.egress is not None:
                batch.append((session.egress, report))
            elif session.fallback is not None:
                session.fallback.push(report, 0.0)
        if batch:
            self.pool.send_rtcp_batch(batch)
        return more

    def levels(self, now: float) -> list[SpeakerLevel]:
        """Every publisher's smoothed level, loudest first."""
        forwarded = {lane.speaker for group in self._groups() for lane in group.lanes}
        out = []
        for publisher in self._publishers.values():
            session = self.live.get(publisher.participant)
            if session is None or not session.permissions.forwards:
                continue
            meter = publisher.meter
            if not meter.active(now, self.config.active_timeout):
                meter = _SILENT
            out.append(meter.snapshot(publisher.participant, publisher.participant in forwarded))
        out.sort(key=lambda level: -level.dbov)
        return out

    def slot_speakers(self, participant: str) -> list[str | None]:
        """Who a participant's slots carry now (for tests and diagnostics)."""
        session = self.live.get(participant)
        if session is None or session.group is None:
            return []
        return session.group.speakers()[: len(session.layout.slots)]

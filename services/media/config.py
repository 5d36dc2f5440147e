"""Settings of the media engine."""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

__all__ = ["IceServer", "MediaConfig"]


@dataclasses.dataclass(frozen=True)
class IceServer:
    """A STUN/TURN server media itself uses (for relayed candidates).

    :param urls: ``stun:`` / ``turn:`` URLs.
    :param username: TURN user name.
    :param credential: TURN password.
    """

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclasses.dataclass(frozen=True)
class MediaConfig:
    """How the engine runs.

    :param host: address the ICE mux binds (an address of this node, not a wildcard).
    :param port: UDP port of the ICE mux; 0 picks a free one.
    :param announce: address written into ICE candidates when it differs from ``host``
        (a node's public or NAT-mapped address).
    :param slot_count: listening slots per listener (the N loudest speakers).
    :param max_slots: most slots an offer may ask for; more are answered inactive.
    :param egress_threads: egress worker threads (0: forward inline on the event loop).
    :param egress_chunk: listeners per ``sendmmsg`` call.
    :param egress_split: threads each fan-out is split across (the egress worker and
        native helpers that never take the GIL; see
        :class:`services.media.egress.FanoutHelpers`): the last listener's packet leaves
        sooner when a core is free. 1 sends from the worker alone.
    :param ice_servers: STUN/TURN servers for media's own candidates (none: host only).
    :param selection_interval: seconds between re-rankings of the speakers.
    :param levels_interval: seconds between speaker-level snapshots for subscribers.
    :param switch_margin_db: how much louder (dB) a newcomer must be to take the slot of
        a quieter speaker (hysteresis).
    :param active_timeout: seconds without a packet after which a speaker counts as
        silent.
    :param rtcp_interval: mean seconds between RTCP reports to each session.
    :param switch_interval: with egress threads, the interpreter's GIL switch interval
        (``sys.setswitchinterval``, process-wide) so a worker waiting for the GIL gets it
        within this time even while the event loop runs Python; ``None`` leaves it.
    :param consent_timeout: longest time until a peer that stopped answering consent
        checks (RFC 7675) is noticed and its session closed.
    :param gc_freeze: freeze joined sessions out of CPython's full collections and reclaim
        what closed ones left every ``gc_unfreeze_after_closed`` closes
        (:class:`services.media.collector.CollectorPolicy`); off by default because it
        freezes the whole process (a node turns it on).
    :param gc_unfreeze_after_closed: closed sessions between two reclaims.
    :param consent_plane: keep connected sessions' ICE consent on a native thread (see
        :mod:`services.media.consent_plane`) instead of the event loop, where the native
        module is built and the kernel steers STUN to it.
    :param native_srtp: protect listeners' RTP with the fast path's own AES-GCM code
        (:mod:`services.media.srtp_native`) when their profile is AES-GCM and this CPU
        can; ``False`` keeps libsrtp for everyone.
    """

    host: str = "127.0.0.1"
    port: int = 0
    announce: str | None = None
    slot_count: int = 3
    max_slots: int = 16
    egress_threads: int = 1
    egress_chunk: int = 64
    egress_split: int = 2
    ice_servers: tuple[IceServer, ...] = ()
    selection_interval: float = 0.1
    levels_interval: float = 0.25
    switch_margin_db: float = 3.0
    active_timeout: float = 1.0
    rtcp_interval: float = 5.0
    switch_interval: float | None = 0.001
    consent_timeout: float = 28.0
    native_srtp: bool = True
    consent_plane: bool = True
    gc_freeze: bool = False
    gc_unfreeze_after_closed: int = 500

    def __post_init__(self) -> None:
        if not 1 <= self.slot_count <= self.max_slots:
            raise ValueError("slot_count must be between 1 and max_slots")
        if self.egress_threads < 0 or self.egress_chunk < 1 or self.egress_split < 1:
            raise ValueError("egress_threads must be >= 0, egress_chunk >= 1 and egress_split >= 1")

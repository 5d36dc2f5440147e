"""Prometheus metrics of the media path (the names are a contract for dashboards).

The forwarding path counts per *batch*, never per listener: a worker adds the number of
packets and bytes of a whole ``sendmmsg`` batch at once and records the batch's latency
with its packet count as the weight, which :class:`WeightedHistogram` makes exact (every
forwarded listener-packet is one observation) at the cost of one lock per batch.
No label carries a user or Space id.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

__all__ = [
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "FORWARD_LATENCY",
    "PACKETS_DROPPED",
    "PACKETS_RECEIVED",
    "PACKETS_SENT",
    "PEERS",
    "RELAY_STREAMS",
    "RECEIVER_JITTER",
    "RECEIVER_LOSS",
    "ROUND_TRIP_TIME",
    "SLOT_SWITCHES",
    "DropReason",
    "LatencySamples",
    "WeightedHistogram",
]

FORWARD_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class DropReason:
    """Values of the ``reason`` label of ``spaces_media_packets_dropped_total``."""

    NOT_PERMITTED = "not_permitted"
    """RTP from a participant who may not publish."""
    MUTED = "muted"
    """RTP from a participant the host muted."""
    NO_PUBLISH_LINE = "no_publish_line"
    """RTP from a session that negotiated no line to publish on."""
    CODEC = "codec"
    """RTP whose payload type is not the negotiated Opus."""
    MALFORMED = "malformed"
    """A packet that does not parse."""
    SRTP = "srtp"
    """SRTP/SRTCP authentication or protection failed."""
    STALE = "stale"
    """A publisher packet older than its slot's last speaker change."""
    TOO_LARGE = "too_large"
    """A packet larger than the egress buffers."""
    SEND_FAILED = "send_failed"
    """The kernel refused the datagram (or its socket buffer was full)."""
    FALLBACK_BACKLOG = "fallback_backlog"
    """A listener on the slow (non-muxed) path fell too far behind."""


class WeightedHistogram(Collector):
    """A histogram that takes an observation count, for per-batch recording.

    ``observe(value, count)`` is ``count`` observations of ``value``, taken under one
    lock. It is exported like a :class:`prometheus_client.Histogram` (``_bucket``,
    ``_sum``, ``_count``).

    :param name: the metric's name (without ``_bucket`` etc.).
    :param documentation: the HELP text.
    :param buckets: upper bounds, increasing (``+Inf`` is added).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()
        self.samples: LatencySamples | None = None

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value``."""
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += count
            self._sum += value * count
        samples = self.samples
        if samples is not None:
            samples.add(value, count)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts = list(self._counts)
            total_sum = self._sum
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=total_sum
        )

    def count(self) -> int:
        """How many observations were recorded (for tests)."""
        with self._lock:
            return sum(self._counts)


class LatencySamples:
    """Raw ``(latency, count)`` records for benchmarks, bounded in size.

    Attach one with ``FORWARD_LATENCY.samples = LatencySamples()``; the histogram's
    buckets are too coarse for p50/p99.
    """

    def __init__(self, limit: int = 2_000_000) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self.values: list[float] = []
        self.counts: list[int] = []

    def add(self, value: float, count: int) -> None:
        """Keep one record (dropped once ``limit`` records are held)."""
        with self._lock:
            if len(self.values) < self._limit:
                self.values.append(value)
                self.counts.append(count)

    def take(self) -> tuple[list[float], list[int]]:
        """Return the records and start afresh."""
        with self._lock:
            values, counts = self.values, self.counts
            self.values, self.counts = [], []
        return values, counts


FORWARD_LATENCY = WeightedHistogram(
    "spaces_media_forward_latency_seconds",
    "Time from a publisher packet's arrival to its SRTP-protected copy leaving for a "
    "listener, one observation per forwarded listener-packet.",
    FORWARD_LATENCY_BUCKETS,
)
REGISTRY.register(FORWARD_LATENCY)

PACKETS_RECEIVED = Counter(
    "spaces_media_packets_received",
    "RTP packets received from publishers (before permission checks).",
)
BYTES_RECEIVED = Counter(
    "spaces_media_bytes_received",
    "Bytes of SRTP received from publishers.",
)
PACKETS_SENT = Counter(
    "spaces_media_packets_sent",
    "RTP packets forwarded to listeners (one per listener).",
)
BYTES_SENT = Counter(
    "spaces_media_bytes_sent",
    "Bytes of SRTP forwarded to listeners.",
)
PACKETS_DROPPED = Counter(
    "spaces_media_packets_dropped",
    "Packets media did not forward, by reason.",
    ["reason"],
)
PEERS = Gauge(
    "spaces_media_peers",
    "Connected media sessions by role (publisher: may publish; listener: may not).",
    ["role"],
)
RELAY_STREAMS = Gauge(
    "spaces_media_relay_streams",
    "Relay streams this node pulls from origins or serves to edges (0 until relays exist).",
)
SLOT_SWITCHES = Counter(
    "spaces_media_slot_switches",
    "Times a listening slot changed speaker (per forwarding group).",
)
RECEIVER_LOSS = Histogram(
    "spaces_media_receiver_loss_ratio",
    "Fraction of packets lost, as listeners report it in RTCP receiver reports.",
    buckets=(0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
RECEIVER_JITTER = Histogram(
    "spaces_media_receiver_jitter_seconds",
    "Interarrival jitter listeners report in RTCP receiver reports.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
ROUND_TRIP_TIME = Histogram(
    "spaces_media_round_trip_time_seconds",
    "Round-trip time to listeners, from RTCP receiver reports (LSR/DLSR).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

"""The media metrics: names are a contract for dashboards; no ids as labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

import services.media.metrics as metrics
from services.media.metrics import FORWARD_LATENCY_BUCKETS, LatencySamples, WeightedHistogram

CONTRACT = {
    "spaces_media_forward_latency_seconds": "histogram",
    "spaces_media_packets_received_total": "counter",
    "spaces_media_packets_sent_total": "counter",
    "spaces_media_bytes_received_total": "counter",
    "spaces_media_bytes_sent_total": "counter",
    "spaces_media_packets_dropped_total": "counter",
    "spaces_media_peers": "gauge",
    "spaces_media_slot_switches_total": "counter",
    "spaces_media_receiver_loss_ratio": "histogram",
    "spaces_media_receiver_jitter_seconds": "histogram",
    "spaces_media_round_trip_time_seconds": "histogram",
}


def test_every_contracted_metric_is_exported_with_its_type() -> None:
    metrics.PEERS.labels("listener").set(0)
    metrics.PACKETS_DROPPED.labels(metrics.DropReason.MUTED).inc(0)
    text = generate_latest().decode()
    for name, kind in CONTRACT.items():
        assert f"# TYPE {name} {kind}" in text, name
        assert f"\n{name}" in text, name
    assert 'spaces_media_packets_dropped_total{reason="muted"}' in text
    assert 'spaces_media_peers{role="listener"}' in text


def test_forward_latency_buckets_span_half_a_millisecond_to_100_ms() -> None:
    assert FORWARD_LATENCY_BUCKETS[0] == 0.0005 and FORWARD_LATENCY_BUCKETS[-1] == 0.1
    assert 0.005 in FORWARD_LATENCY_BUCKETS


def test_a_weighted_observation_counts_every_packet() -> None:
    registry = CollectorRegistry()
    histogram = WeightedHistogram("t_seconds", "test", (0.001, 0.01))
    registry.register(histogram)
    histogram.samples = LatencySamples(limit=1)
    histogram.observe(0.0005, 64)
    histogram.observe(0.005, 3)
    histogram.observe(1.0, 1)
    text = generate_latest(registry).decode()
    assert 't_seconds_bucket{le="0.001"} 64.0' in text
    assert 't_seconds_bucket{le="0.01"} 67.0' in text
    assert 't_seconds_bucket{le="+Inf"} 68.0' in text
    assert "t_seconds_count 68.0" in text
    assert abs((registry.get_sample_value("t_seconds_sum") or 0) - 1.047) < 1e-9
    assert histogram.count() == 68
    assert histogram.samples.take() == ([0.0005], [64]), "bounded: only the first record kept"

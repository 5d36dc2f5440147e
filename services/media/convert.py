"""Media's internal values as API messages: node reports and recordings."""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from spaces.media.v1 import media_resources_pb2 as res

from services.media.registry import NodeInfo

logger = logging.getLogger(__name__)

__all__ = ["node_stats", "recording_message"]


def _timestamp(unix: float | None) -> timestamp_pb2.Timestamp | None:
    if unix is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


def node_stats(node: NodeInfo) -> res.NodeStats:
    """A registry report as the API's ``NodeStats``."""
    return res.NodeStats(
        node=f"mediaNodes/{node.node_id}",
        endpoint=node.endpoint,
        state=res.NODE_STATE_DRAINING if node.draining else res.NODE_STATE_SERVING,
        capacity=node.capacity,
        load=node.load,
        publisher_count=node.publishers,
        listener_count=node.listeners,
        relay_count=node.relays,
        spaces=[
            res.SpaceLoad(
                space=f"spaces/{share.space}",
                role=res.NODE_ROLE_ORIGIN if share.origin else res.NODE_ROLE_EDGE,
                publisher_count=share.publishers,
                listener_count=share.listeners,
            )
            for share in node.spaces
        ],
        report_time=_timestamp(node.report_time),
        drain_deadline_time=_timestamp(node.drain_deadline),
    )


def recording_message(space: str, item: dict[str, Any]) -> res.Recording:
    """A recording's registry description as the API's ``Recording``."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(float(item.get("duration_s", 0.0)) * 1e9))
    return res.Recording(
        name=f"spaces/{space}/recordings/{item['id']}",
        space=f"spaces/{space}",
        format="audio/ogg; codecs=opus",
        duration=duration,
        size_bytes=int(item.get("size_bytes", 0)),
        state=int(item.get("state", res.Recording.STATE_RECORDING)),  # type: ignore[arg-type]
        create_time=_timestamp(item.get("create_time")),
        ready_time=_timestamp(item.get("ready_time")),
        expire_time=_timestamp(item.get("expire_time")),
    )

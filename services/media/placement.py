"""Placement rules: which node becomes a Space's origin and where a participant connects.

Pure functions over the registry's view of the live nodes, so the rules are unit-tested
without Redis; :class:`services.media.node.MediaNode` applies them with the registry.

* A new Space goes to the serving node with the lowest load that has room.
* Publishers always connect to the Space's origin: the N-loudest selection needs every
  speaker's packets in one place.
* Listeners connect to the origin while it has room, then to edge nodes, which pull one
  relay of the Space from the origin: an edge that already serves the Space is preferred
  (its relay is shared), then the least loaded node with room. With no room anywhere a
  listener is refused (``NO_MEDIA_CAPACITY``, retry later).
* An origin that died, or is draining, is replaced by the best other node: the next
  placement of the Space claims the origin role for it (compare-and-set in the registry,
  so concurrent placements agree) and everyone moves there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from services.media.registry import NodeInfo

logger = logging.getLogger(__name__)

__all__ = ["best_edge", "best_node", "origin_usable"]


def best_node(nodes: Iterable[NodeInfo], *, avoid: str | None = None) -> NodeInfo | None:
    """The serving node with room and the lowest load (ties: the lowest id), if any.

    :param avoid: a node id not to pick (one the participant is leaving).
    """
    candidates = [n for n in nodes if n.has_room and n.node_id != avoid]
    if not candidates:
        return None
    return min(candidates, key=lambda n: (n.load, n.node_id))


def origin_usable(origin: NodeInfo | None, *, avoid: str | None = None) -> bool:
    """Whether a Space may stay on its origin: alive, not draining, not being left."""
    return origin is not None and not origin.draining and origin.node_id != avoid


def best_edge(
    nodes: Iterable[NodeInfo], space: str, *, origin: str, avoid: str | None = None
) -> NodeInfo | None:
    """The node a listener of a full origin goes to: one already serving the Space first."""
    candidates = [n for n in nodes if n.has_room and n.node_id not in (origin, avoid)]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda n: (not any(share.space == space for share in n.spaces), n.load, n.node_id),
    )

"""Placement rules: which node becomes a Space's origin and where a participant connects.

Pure functions over the registry's view of the live nodes, so the rules are unit-tested
without Redis; :class:`services.media.node.MediaNode` applies them with the registry.

* A new Space goes to the serving node with the lowest load that has room.
* Publishers always connect to the Space's origin: the N-loudest selection needs every
  speaker's packets in one place.
* Listeners connect to the origin while it has room. Listeners beyond that would go to
  edge nodes pulling relay streams from the origin; until relays exist there is no edge,
  and a full origin refuses more listeners (``NO_MEDIA_CAPACITY``, retry later).
* An origin that died, or is draining, is replaced by the best other node: the next
  placement of the Space claims the origin role for it (compare-and-set in the registry,
  so concurrent placements agree) and everyone moves there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from services.media.registry import NodeInfo

logger = logging.getLogger(__name__)

__all__ = ["best_node", "origin_usable"]


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

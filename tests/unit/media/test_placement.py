"""Placement rules over the registry's view of the nodes (pure)."""

from __future__ import annotations

from services.media.placement import best_node, origin_usable
from services.media.registry import NodeInfo, ParticipantPermissions


def node(node_id: str, *, peers: int = 0, capacity: int = 100, draining: bool = False) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        address=f"{node_id}:50053",
        endpoint="",
        draining=draining,
        capacity=capacity,
        publishers=0,
        listeners=peers,
        relays=0,
        report_time=0.0,
    )


def test_the_least_loaded_node_with_room_wins_ties_by_id() -> None:
    nodes = [node("b", peers=10), node("a", peers=10), node("c", peers=50, capacity=1000)]
    assert best_node(nodes) == nodes[2], "5% load beats 10%"
    assert best_node(nodes[:2]) == nodes[1], "equal load: the lowest id"


def test_full_draining_and_avoided_nodes_are_never_picked() -> None:
    nodes = [node("a", peers=100), node("b", draining=True), node("c")]
    assert best_node(nodes) == nodes[2]
    assert best_node(nodes, avoid="c") is None
    assert best_node([]) is None


def test_pending_placements_count_as_load() -> None:
    busy = NodeInfo.from_json(node("a", peers=99).to_json(), pending=1)
    assert busy.peers == 100 and not busy.has_room and busy.load == 1.0


def test_an_origin_is_kept_only_while_alive_serving_and_not_left() -> None:
    assert origin_usable(node("a"))
    assert not origin_usable(None), "dead: its report expired"
    assert not origin_usable(node("a", draining=True))
    assert not origin_usable(node("a"), avoid="a")


def test_reports_and_permissions_survive_their_encoding() -> None:
    report = node("a", peers=3)
    assert NodeInfo.from_json(report.to_json()) == report
    permissions = ParticipantPermissions(may_publish=True, muted=False, removed=True, revision=7)
    assert ParticipantPermissions.decode(permissions.encode()) == permissions


def test_an_edge_already_serving_the_space_is_preferred_then_the_least_loaded() -> None:
    from services.media.placement import best_edge
    from services.media.registry import SpaceShare

    serving = NodeInfo.from_json(node("c", peers=50).to_json())
    serving = NodeInfo(**{**serving.__dict__, "spaces": (SpaceShare("s1", 0, 50, False),)})
    nodes = [node("origin", peers=100), node("b", peers=10), serving]
    assert best_edge(nodes, "s1", origin="origin") == serving, "its relay is shared"
    assert best_edge(nodes, "s2", origin="origin") == nodes[1], "otherwise the least loaded"
    assert best_edge(nodes, "s1", origin="origin", avoid="c") == nodes[1]
    assert best_edge([node("origin")], "s1", origin="origin") is None, "never the origin"

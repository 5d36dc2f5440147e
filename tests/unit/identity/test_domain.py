"""Identity's pure rules: names, handles, authorization, follows, eligibility, paging."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.auth import Principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
)
from services.identity import domain
from services.identity.domain import Edges, EligibilityReason, FollowState, PageQuery

ALICE = Principal.user("alice01")
ROOMS = Principal.service("rooms")


def reason_of(error: pytest.ExceptionInfo[ServiceError]) -> str:
    return error.value.reason


# -- handles ------------------------------------------------------------------------------


@pytest.mark.parametrize("handle", ["a", "Alice_01", "x" * 15, "___", "0"])
def test_valid_handles(handle: str) -> None:
    assert domain.is_valid_handle(handle)


@pytest.mark.parametrize("handle", ["", "x" * 16, "bad-dash", "dot.ted", "ünï", "sp ace", "@at"])
def test_invalid_handles(handle: str) -> None:
    assert not domain.is_valid_handle(handle)


def test_handles_are_unique_ignoring_case() -> None:
    assert domain.handle_key("Alice_01") == domain.handle_key("aLICE_01") == "alice_01"


# -- names and who may act ----------------------------------------------------------------


def test_me_resolves_to_the_calling_user_only() -> None:
    assert domain.resolve_user(domain.parse_user_name("users/me"), ALICE) == "alice01"
    assert domain.resolve_user("bob", ROOMS) == "bob"
    for principal in (ROOMS, None):
        with pytest.raises(InvalidArgument) as caught:
            domain.resolve_user("me", principal)
        assert reason_of(caught) == "ME_WITHOUT_USER"
    with pytest.raises(InvalidArgument) as caught:
        domain.caller_user_id(ROOMS)
    assert reason_of(caught) == "ME_WITHOUT_USER"


@pytest.mark.parametrize("name", ["users/", "user/x", "users/A", "users/x/y", "users/-x", ""])
def test_bad_user_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        domain.parse_user_name(name)


def test_relationship_names() -> None:
    assert domain.parse_relationship_name("users/me/relationships/bob") == ("me", "bob")
    with pytest.raises(InvalidArgument):
        domain.parse_relationship_name("users/me/friends/bob")
    assert domain.relationship_name("a", "b") == "users/a/relationships/b"


def test_only_the_user_themselves_passes_require_self() -> None:
    domain.require_self("alice01", ALICE, "update the profile")
    for principal in (Principal.user("bob"), ROOMS, None):
        with pytest.raises(PermissionDenied) as caught:
            domain.require_self("alice01", principal, "update the profile")
        assert reason_of(caught) == "NOT_SELF"


def test_no_following_or_blocking_oneself() -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.check_not_self("a", "a", reason="CANNOT_FOLLOW_SELF", what="follow")
    assert reason_of(caught) == "CANNOT_FOLLOW_SELF"
    domain.check_not_self("a", "b", reason="CANNOT_FOLLOW_SELF", what="follow")


# -- profiles -----------------------------------------------------------------------------


def test_profile_changes_follow_the_mask() -> None:
    changes = domain.profile_changes(
        ["bio", "avatar_uri"], display_name="ignored", bio="", avatar_uri="https://x/y.png"
    )
    assert changes == {"bio": "", "avatar_uri": "https://x/y.png"}
    for paths, name in ((["handle"], "A"), ([], "A"), (["display_name"], "")):
        with pytest.raises(InvalidArgument):
            domain.profile_changes(paths, display_name=name, bio="", avatar_uri="")


def test_create_fingerprint_covers_the_profile() -> None:
    base = domain.create_fingerprint("al", "Al", "", "")
    assert base == domain.create_fingerprint("al", "Al", "", "")
    assert base != domain.create_fingerprint("Al", "Al", "", "")
    assert base != domain.create_fingerprint("al", "Al", "bio", "")
    # Field boundaries matter: no two profiles share a fingerprint by concatenation.
    assert domain.create_fingerprint("a", "bc", "", "") != domain.create_fingerprint(
        "ab", "c", "", ""
    )


# -- follows ------------------------------------------------------------------------------


def state(count: int = 0, **edges: bool) -> FollowState:
    return FollowState(Edges(**edges), following_count=count)


def test_follow_rules() -> None:
    domain.check_follow(state(), max_following=10)
    domain.check_follow(state(following=True, count=10), max_following=10)  # no new edge
    domain.check_follow(state(followed_by=True), max_following=10)
    with pytest.raises(PermissionDenied) as denied:
        domain.check_follow(state(blocked_by=True, blocking=True), max_following=10)
    assert reason_of(denied) == "BLOCKED_BY_USER"  # being blocked is the stronger reason
    with pytest.raises(FailedPrecondition) as blocked:
        domain.check_follow(state(blocking=True), max_following=10)
    assert reason_of(blocked) == "USER_BLOCKED"
    with pytest.raises(ResourceExhausted) as full:
        domain.check_follow(state(count=10), max_following=10)
    assert reason_of(full) == "FOLLOW_LIMIT_REACHED"


def test_lists_are_refused_to_the_blocked() -> None:
    domain.check_may_list(Edges(following=True, blocked_by=True))
    with pytest.raises(PermissionDenied) as caught:
        domain.check_may_list(Edges(blocking=True))
    assert reason_of(caught) == "BLOCKED_BY_USER"


# -- host eligibility ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("followers", "minimum", "eligible"),
    [(0, 0, True), (5, 0, True), (599, 600, False), (600, 600, True), (10**6, 600, True)],
)
def test_host_eligibility(followers: int, minimum: int, eligible: bool) -> None:
    verdict = domain.host_eligibility(followers, minimum)
    assert verdict.eligible is eligible
    assert verdict.reason is (
        EligibilityReason.ELIGIBLE if eligible else EligibilityReason.NOT_ENOUGH_FOLLOWERS
    )
    assert (verdict.min_followers, verdict.follower_count) == (minimum, followers)


# -- refresh ------------------------------------------------------------------------------


def test_refresh_failures() -> None:
    assert domain.refresh_failure(domain.RefreshStatus.REUSED).reason == "REFRESH_TOKEN_REUSED"
    for status in (
        domain.RefreshStatus.UNKNOWN,
        domain.RefreshStatus.EXPIRED,
        domain.RefreshStatus.REVOKED,
    ):
        assert domain.refresh_failure(status).reason == "REFRESH_TOKEN_INVALID"
    with pytest.raises(ValueError):
        domain.refresh_failure(domain.RefreshStatus.ROTATED)


# -- paging -------------------------------------------------------------------------------


def test_page_sizes() -> None:
    assert [domain.page_size(n) for n in (0, -1, 1, 100, 101)] == [50, 50, 1, 100, 100]
    assert [domain.stream_batch_size(n) for n in (0, 7, 10_000, 10_001)] == [
        1000,
        7,
        10_000,
        10_000,
    ]


@given(
    parent=st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True),
    position=st.integers(min_value=0, max_value=2**63 - 1),
    query=st.sampled_from(list(PageQuery)),
)
def test_page_tokens_round_trip(parent: str, position: int, query: PageQuery) -> None:
    token = domain.encode_page_token(query, parent, position)
    assert domain.decode_page_token(token, query, parent) == position
    assert domain.decode_cursor(token, query, parent) == position


def test_page_tokens_are_bound_to_their_query() -> None:
    token = domain.encode_page_token(PageQuery.FOLLOWERS, "alice", 42)
    assert domain.decode_page_token("", PageQuery.FOLLOWERS, "alice") is None
    assert domain.decode_cursor("", PageQuery.FOLLOWER_IDS, "alice") == 0
    forged = base64.urlsafe_b64encode(b"fr.alice.-1").decode().rstrip("=")
    for bad, query, parent in (
        (token, PageQuery.FOLLOWING, "alice"),
        (token, PageQuery.FOLLOWERS, "bob"),
        ("%%%", PageQuery.FOLLOWERS, "alice"),
        ("Zm9v", PageQuery.FOLLOWERS, "alice"),
        (forged, PageQuery.FOLLOWERS, "alice"),
        (token + "A", PageQuery.FOLLOWERS, "alice"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            domain.decode_page_token(bad, query, parent)
        assert reason_of(caught) == "PAGE_TOKEN_INVALID"
    with pytest.raises(InvalidArgument) as caught:
        domain.decode_cursor(token, PageQuery.FOLLOWER_IDS, "alice")
    assert reason_of(caught) == "CURSOR_INVALID"


# -- events -------------------------------------------------------------------------------


def test_events_name_the_relationship_that_changed() -> None:
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    event = domain.user_blocked("a", "b", now)
    assert (event.event_type, event.key) == ("user.blocked", "users/a/relationships/b")
    assert event.payload.event_time.ToDatetime(dt.UTC) == now  # type: ignore[attr-defined]
    assert domain.user_unfollowed("a", "b", now).event_type == "user.unfollowed"

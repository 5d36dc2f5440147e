"""Identity's rules, free of I/O: names, handles, who may do what, follow and block rules,
host eligibility, page tokens and the events each change emits.

Rules raise :class:`~services.common.errors.ServiceError` subclasses carrying the reasons
the proto documents, so the servicer only decodes requests and encodes responses.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Sequence

from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from spaces.identity.v1 import identity_events_pb2 as events_pb

from services.common.auth import Principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_STREAM_BATCH",
    "ME",
    "Edges",
    "EligibilityReason",
    "Event",
    "FollowState",
    "HostEligibility",
    "PageQuery",
    "RefreshStatus",
    "User",
    "check_follow",
    "check_not_self",
    "create_fingerprint",
    "decode_cursor",
    "decode_page_token",
    "encode_cursor",
    "encode_page_token",
    "handle_key",
    "host_eligibility",
    "page_size",
    "parse_relationship_name",
    "parse_user_name",
    "profile_changes",
    "refresh_failure",
    "relationship_name",
    "require_self",
    "resolve_user",
    "user_name",
]

ME = "me"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
DEFAULT_STREAM_BATCH = 1000
MAX_STREAM_BATCH = 10_000
HANDLE_MAX_LENGTH = 15
UPDATABLE_FIELDS = ("display_name", "bio", "avatar_uri")

_HANDLE = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_ID = r"[a-z0-9][a-z0-9-]{0,62}"
_USER_NAME = re.compile(rf"^users/({_ID})$")
_RELATIONSHIP_NAME = re.compile(rf"^users/({_ID})/relationships/({_ID})$")
_TOKEN_ALPHABET = re.compile(r"^[A-Za-z0-9_-]*$")


# -- data --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class User:
    """An account as identity keeps it (never the password hash)."""

    id: str
    handle: str
    display_name: str
    bio: str
    avatar_uri: str
    follower_count: int
    following_count: int
    create_time: dt.datetime
    update_time: dt.datetime


@dataclasses.dataclass(frozen=True)
class Edges:
    """The follow and block edges between a subject and another user, from the subject."""

    following: bool = False
    followed_by: bool = False
    blocking: bool = False
    blocked_by: bool = False


@dataclasses.dataclass(frozen=True)
class Event:
    """An event to append to the outbox in the transaction of the change it describes."""

    event_type: str
    key: str
    payload: pb_message.Message


# -- names -------------------------------------------------------------------------------


def user_name(user_id: str) -> str:
    """``users/{user_id}``."""
    return f"users/{user_id}"


def relationship_name(subject_id: str, other_id: str) -> str:
    """``users/{subject_id}/relationships/{other_id}``."""
    return f"users/{subject_id}/relationships/{other_id}"


def parse_user_name(name: str, field: str = "name") -> str:
    """Return the last segment of ``users/{user}`` (possibly ``me``).

    :raises InvalidArgument: the name is not a user name.
    """
    match = _USER_NAME.match(name)
    if match is None:
        raise InvalidArgument(
            f"{field} must look like users/{{user}}",
            field_violations=[(field, "must look like users/{user}")],
        )
    return match.group(1)


def parse_relationship_name(name: str) -> tuple[str, str]:
    """Return the subject and other segments of ``users/{user}/relationships/{other}``.

    :raises InvalidArgument: the name is not a relationship name.
    """
    match = _RELATIONSHIP_NAME.match(name)
    if match is None:
        raise InvalidArgument(
            "name must look like users/{user}/relationships/{other}",
            field_violations=[("name", "must look like users/{user}/relationships/{other}")],
        )
    return match.group(1), match.group(2)


def resolve_user(segment: str, principal: Principal | None) -> str:
    """Turn a user segment into a user id, ``me`` being the caller.

    :raises InvalidArgument: ``ME_WITHOUT_USER`` when ``me`` is used without a user token.
    """
    if segment != ME:
        return segment
    if principal is None or not principal.is_user or not principal.user_id:
        raise InvalidArgument("users/me needs a user's access token", reason="ME_WITHOUT_USER")
    return principal.user_id


def require_self(user_id: str, principal: Principal | None, what: str) -> None:
    """Allow only the user ``user_id`` themselves.

    :raises PermissionDenied: ``NOT_SELF`` for anyone else, services included.
    """
    if principal is None or not principal.is_user or principal.user_id != user_id:
        raise PermissionDenied(f"a user may only {what} their own", reason="NOT_SELF")


def check_not_self(caller_id: str, target_id: str, *, reason: str, what: str) -> None:
    """Refuse an action a user cannot take on themselves (following, blocking).

    :raises InvalidArgument: with ``reason`` when ``caller_id`` is ``target_id``.
    """
    if caller_id == target_id:
        raise InvalidArgument(f"you cannot {what} yourself", reason=reason)


def caller_user_id(principal: Principal | None) -> str:
    """The id of the calling user, for RPCs whose subject is implicitly the caller.

    :raises InvalidArgument: ``ME_WITHOUT_USER`` for a service token: such an RPC names
        the caller as surely as ``users/me`` does, and a service is no user.
    """
    if principal is None or not principal.is_user or not principal.user_id:
        raise InvalidArgument(
            "this method acts for the calling user; a service token has none",
            reason="ME_WITHOUT_USER",
        )
    return principal.user_id


def user_not_found(user_id: str, *, name: str | None = None) -> NotFound:
    """The NOT_FOUND error of an unknown user, naming it in the ErrorInfo metadata."""
    shown = name or user_name(user_id)
    return NotFound(f"{shown} does not exist", reason="USER_NOT_FOUND", metadata={"name": shown})


# -- handles and profiles ----------------------------------------------------------------


def is_valid_handle(handle: str) -> bool:
    """1 to 15 of ASCII letters, digits and ``_``."""
    return _HANDLE.match(handle) is not None


def handle_key(handle: str) -> str:
    """The form handles are unique in: lower-case (handles are ASCII, so this is exact)."""
    return handle.lower()


def profile_changes(
    paths: Sequence[str], *, display_name: str, bio: str, avatar_uri: str
) -> dict[str, str]:
    """The column values an UpdateUser with ``update_mask.paths`` sets.

    :raises InvalidArgument: an unknown or missing path, or display_name cleared.
    """
    if not paths:
        raise InvalidArgument(
            "update_mask must list at least one field",
            field_violations=[("update_mask", "must list at least one field")],
        )
    values = {"display_name": display_name, "bio": bio, "avatar_uri": avatar_uri}
    changes: dict[str, str] = {}
    for path in paths:
        if path not in values:
            raise InvalidArgument(
                f"update_mask path {path!r} cannot be updated",
                field_violations=[("update_mask", f"{path!r} is not one of {UPDATABLE_FIELDS}")],
            )
        changes[path] = values[path]
    if changes.get("display_name") == "":
        raise InvalidArgument(
            "display_name cannot be cleared",
            field_violations=[("user.display_name", "cannot be cleared")],
        )
    return changes


def create_fingerprint(handle: str, display_name: str, bio: str, avatar_uri: str) -> bytes:
    """What makes two CreateUser requests "the same" (besides the password, checked apart).

    The password stays out on purpose: a fast hash of it would be an offline guessing aid.
    """
    canonical = json.dumps([handle, display_name, bio, avatar_uri], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


# -- follow graph ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FollowState:
    """What a follow depends on, read under the locks of both users.

    :ivar edges: the follower's edges to the followee.
    :ivar following_count: how many users the follower follows now.
    """

    edges: Edges
    following_count: int


def check_follow(state: FollowState, *, max_following: int) -> None:
    """May the follower follow the followee now?

    :raises PermissionDenied: ``BLOCKED_BY_USER``, the followee blocks the follower.
    :raises FailedPrecondition: ``USER_BLOCKED``, the follower blocks the followee.
    :raises ResourceExhausted: ``FOLLOW_LIMIT_REACHED``, a new follow would pass the cap.
    """
    if state.edges.blocked_by:
        raise PermissionDenied("this user has blocked you", reason="BLOCKED_BY_USER")
    if state.edges.blocking:
        raise FailedPrecondition("you have blocked this user; unblock first", reason="USER_BLOCKED")
    if not state.edges.following and state.following_count >= max_following:
        raise ResourceExhausted(
            f"you already follow {state.following_count} users",
            reason="FOLLOW_LIMIT_REACHED",
            quota_subject="user",
            quota_description=f"at most {max_following} followed users",
        )


def check_may_list(edges_of_parent_to_caller: Edges) -> None:
    """May the caller list whom the parent follows or is followed by?

    :param edges_of_parent_to_caller: the parent's edges to the caller.
    :raises PermissionDenied: ``BLOCKED_BY_USER`` when the parent blocks the caller.
    """
    if edges_of_parent_to_caller.blocking:
        raise PermissionDenied("this user has blocked you", reason="BLOCKED_BY_USER")


class EligibilityReason(enum.StrEnum):
    """Why a user may or may not host."""

    ELIGIBLE = "eligible"
    NOT_ENOUGH_FOLLOWERS = "not_enough_followers"


@dataclasses.dataclass(frozen=True)
class HostEligibility:
    """The host policy's answer for one user."""

    eligible: bool
    reason: EligibilityReason
    min_followers: int
    follower_count: int


def host_eligibility(follower_count: int, min_followers: int) -> HostEligibility:
    """Apply the host policy: hosting needs at least ``min_followers`` followers."""
    eligible = follower_count >= min_followers
    reason = EligibilityReason.ELIGIBLE if eligible else EligibilityReason.NOT_ENOUGH_FOLLOWERS
    return HostEligibility(eligible, reason, min_followers, follower_count)


# -- refresh tokens ----------------------------------------------------------------------


class RefreshStatus(enum.Enum):
    """What presenting a refresh token found."""

    ROTATED = "rotated"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    REUSED = "reused"


def refresh_failure(status: RefreshStatus) -> Unauthenticated:
    """The error for a refresh that did not rotate.

    :raises ValueError: for :attr:`RefreshStatus.ROTATED`, which is no failure.
    """
    if status is RefreshStatus.ROTATED:
        raise ValueError("a rotated refresh token is not a failure")
    if status is RefreshStatus.REUSED:
        return Unauthenticated(
            "this refresh token was already used; the session is revoked, log in again",
            reason="REFRESH_TOKEN_REUSED",
        )
    return Unauthenticated(
        "the refresh token is unknown, expired or revoked; log in again",
        reason="REFRESH_TOKEN_INVALID",
    )


# -- paging ------------------------------------------------------------------------------


class PageQuery(enum.StrEnum):
    """The queries page tokens and cursors belong to (a token fits only its own)."""

    FOLLOWERS = "fr"
    FOLLOWING = "fg"
    BLOCKED = "bl"
    FOLLOWER_IDS = "fri"
    FOLLOWING_IDS = "fgi"


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, at most :data:`MAX_PAGE_SIZE`."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def stream_batch_size(requested: int) -> int:
    """Ids per stream batch: the default for 0, at most :data:`MAX_STREAM_BATCH`."""
    if requested <= 0:
        return DEFAULT_STREAM_BATCH
    return min(requested, MAX_STREAM_BATCH)


def _encode_position(query: PageQuery, parent_id: str, position: int) -> str:
    raw = f"{query.value}.{parent_id}.{position}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_position(token: str, query: PageQuery, parent_id: str) -> int | None:
    if not _TOKEN_ALPHABET.match(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    parts = raw.split(".")
    if len(parts) != 3 or parts[0] != query.value or parts[1] != parent_id:
        return None
    if not parts[2].isdigit() or len(parts[2]) > 19:
        return None
    return int(parts[2])


def encode_page_token(query: PageQuery, parent_id: str, position: int) -> str:
    """An opaque token resuming ``query`` on ``parent_id`` after edge ``position``.

    Opaque to clients, not secret: it only says where the last page ended, and forging
    one reveals nothing the caller could not list anyway.
    """
    return _encode_position(query, parent_id, position)


def decode_page_token(token: str, query: PageQuery, parent_id: str) -> int | None:
    """The position a page token resumes after; ``None`` for the first page.

    :raises InvalidArgument: ``PAGE_TOKEN_INVALID`` when malformed or from another query.
    """
    if not token:
        return None
    position = _decode_position(token, query, parent_id)
    if position is None:
        raise InvalidArgument(
            "page_token is malformed or belongs to another query",
            reason="PAGE_TOKEN_INVALID",
            field_violations=[("page_token", "malformed or from another query")],
        )
    return position


def encode_cursor(query: PageQuery, parent_id: str, position: int) -> str:
    """A stream cursor: resumes the stream of ``parent_id`` after ``position``."""
    return _encode_position(query, parent_id, position)


def decode_cursor(cursor: str, query: PageQuery, parent_id: str) -> int:
    """The position a stream cursor resumes after; 0 (the start) when empty.

    :raises InvalidArgument: ``CURSOR_INVALID`` when malformed or for another user.
    """
    if not cursor:
        return 0
    position = _decode_position(cursor, query, parent_id)
    if position is None:
        raise InvalidArgument(
            "cursor is malformed or belongs to another user",
            reason="CURSOR_INVALID",
            field_violations=[("cursor", "malformed or for another user")],
        )
    return position


# -- events ------------------------------------------------------------------------------


def _timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def user_created(user: User) -> Event:
    """UserCreatedEvent for a new account."""
    payload = events_pb.UserCreatedEvent(
        user_id=user.id, handle=user.handle, event_time=_timestamp(user.create_time)
    )
    return Event("user.created", user_name(user.id), payload)


def user_followed(follower_id: str, followee_id: str, now: dt.datetime) -> Event:
    """UserFollowedEvent; keyed by the relationship that changed."""
    payload = events_pb.UserFollowedEvent(
        follower_id=follower_id, followee_id=followee_id, event_time=_timestamp(now)
    )
    return Event("user.followed", relationship_name(follower_id, followee_id), payload)


def user_unfollowed(follower_id: str, followee_id: str, now: dt.datetime) -> Event:
    """UserUnfollowedEvent (an unfollow, or a follow removed by a block)."""
    payload = events_pb.UserUnfollowedEvent(
        follower_id=follower_id, followee_id=followee_id, event_time=_timestamp(now)
    )
    return Event("user.unfollowed", relationship_name(follower_id, followee_id), payload)


def user_blocked(blocker_id: str, blocked_id: str, now: dt.datetime) -> Event:
    """UserBlockedEvent."""
    payload = events_pb.UserBlockedEvent(
        blocker_id=blocker_id, blocked_id=blocked_id, event_time=_timestamp(now)
    )
    return Event("user.blocked", relationship_name(blocker_id, blocked_id), payload)


def user_unblocked(blocker_id: str, blocked_id: str, now: dt.datetime) -> Event:
    """UserUnblockedEvent."""
    payload = events_pb.UserUnblockedEvent(
        blocker_id=blocker_id, blocked_id=blocked_id, event_time=_timestamp(now)
    )
    return Event("user.unblocked", relationship_name(blocker_id, blocked_id), payload)


def new_family_id() -> uuid.UUID:
    """A new refresh-token family (one log-in session)."""
    return uuid.uuid4()

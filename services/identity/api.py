"""The gRPC servicer of ``spaces.identity.v1.IdentityService``.

Each method decodes its request (validation already ran in the interceptor), authorizes
the caller (:func:`services.common.context.optional_principal`), applies the rules of
:mod:`services.identity.domain` through the store, and encodes the answer. Errors are
:class:`~services.common.errors.ServiceError` subclasses with the reasons the proto lists;
the error interceptor turns them into statuses.

Passwords and tokens pass through here and must never be logged: no request is logged
as a whole, and messages name users by id only.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2
from prometheus_client import Counter
from spaces.identity.v1 import identity_resources_pb2 as resources_pb
from spaces.identity.v1 import identity_service_pb2 as pb
from spaces.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.common.context import optional_principal
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.ids import new_id
from services.identity import domain
from services.identity.domain import Edges, PageQuery, User
from services.identity.passwords import PasswordHasher
from services.identity.settings import IdentitySettings
from services.identity.signing import Clock, KeyManager, utc_now
from services.identity.store import HandleTaken, IdentityStore, RequestIdTaken, UnknownUser
from services.identity.throttle import LoginThrottle, client_address
from services.identity.tokens import (
    IssuedToken,
    hash_refresh_token,
    issue_access_token,
    new_refresh_token,
)

if TYPE_CHECKING:
    import grpc.aio

    Context = grpc.aio.ServicerContext[Any, Any]

logger = logging.getLogger(__name__)

__all__ = ["IdentityApi"]

FORWARDED_FOR_HEADER = "x-forwarded-for"

# Security signals for dashboards and alerts (no user ids as labels).
LOGINS = Counter(
    "spaces_identity_logins_total",
    "Log-in attempts by outcome: success, invalid_credentials, throttled.",
    ["outcome"],
)
REFRESHES = Counter(
    "spaces_identity_refreshes_total",
    "Refresh-token presentations by outcome: rotated, unknown, expired, revoked, reused.",
    ["outcome"],
)

_ELIGIBILITY = {
    domain.EligibilityReason.ELIGIBLE: resources_pb.HOST_ELIGIBILITY_REASON_ELIGIBLE,
    domain.EligibilityReason.NOT_ENOUGH_FOLLOWERS: (
        resources_pb.HOST_ELIGIBILITY_REASON_NOT_ENOUGH_FOLLOWERS
    ),
}


class IdentityApi(pb_grpc.IdentityServiceServicer):
    """Implements IdentityService.

    The store and the throttle need the database and Redis, which open in a start-up hook
    after the server is built, so they are attached by :meth:`attach`; the readiness
    interceptor keeps calls out until then.

    :param settings: identity's settings (policy, lifetimes, limits).
    :param keys: the signing keys.
    :param hasher: password hashing.
    :param clock: the time source.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        keys: KeyManager,
        hasher: PasswordHasher,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._hasher = hasher
        self._clock = clock
        self._store_: IdentityStore | None = None
        self._throttle_: LoginThrottle | None = None

    def attach(self, store: IdentityStore, throttle: LoginThrottle) -> None:
        """Give the servicer its storage and log-in throttle once they are open."""
        self._store_ = store
        self._throttle_ = throttle

    @property
    def _store(self) -> IdentityStore:
        if self._store_ is None:
            raise Unavailable("identity is starting", reason="STARTING", retry_after=1.0)
        return self._store_

    @property
    def _throttle(self) -> LoginThrottle:
        if self._throttle_ is None:
            raise Unavailable("identity is starting", reason="STARTING", retry_after=1.0)
        return self._throttle_

    # -- accounts and sessions ---------------------------------------------------------

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        profile = request.user
        request_id = uuid.UUID(request.request_id)
        fingerprint = domain.create_fingerprint(
            profile.handle, profile.display_name, profile.bio, profile.avatar_uri
        )
        earlier = await self._store.find_create_request(request_id)
        if earlier is not None:
            return await self._replay_create(earlier, fingerprint, request, context)
        password_hash = await self._hasher.hash(request.password)
        now = self._clock()
        user = User(
            id=new_id(),
            handle=profile.handle,
            display_name=profile.display_name,
            bio=profile.bio,
            avatar_uri=profile.avatar_uri,
            follower_count=0,
            following_count=0,
            create_time=now,
            update_time=now,
        )
        try:
            created = await self._store.create_user(user, password_hash, request_id, fingerprint)
        except (HandleTaken, RequestIdTaken) as error:
            # A retry of this very request may have committed first (then the handle is
            # "taken" by it): answer as the retry it is.
            earlier = await self._store.find_create_request(request_id)
            if earlier is not None:
                return await self._replay_create(earlier, fingerprint, request, context)
            if isinstance(error, HandleTaken):
                raise AlreadyExists(
                    "this handle is taken", reason="HANDLE_TAKEN", metadata={"handle": user.handle}
                ) from None
            raise
        logger.info("created user %s", created.id)
        tokens = await self._start_session(created.id)
        return pb.CreateUserResponse(user=_user_pb(created), tokens=tokens)

    async def _replay_create(
        self,
        earlier: tuple[bytes, str],
        fingerprint: bytes,
        request: pb.CreateUserRequest,
        context: Context,
    ) -> pb.CreateUserResponse:
        """Answer a retried CreateUser: the same account, fresh tokens.

        The retry must carry the same password, so the key alone never yields tokens; and
        since checking it is a password guess, it counts against the log-in throttle.
        """
        earlier_fingerprint, user_id = earlier
        reused = FailedPrecondition(
            "request_id was used before with a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
        if earlier_fingerprint != fingerprint:
            raise reused
        slot = await self._throttle.acquire(
            domain.handle_key(request.user.handle), _client(context)
        )
        stored_hash = await self._store.get_password_hash(user_id)
        if stored_hash is None or not await self._hasher.verify(stored_hash, request.password):
            raise reused
        await self._throttle.succeeded(slot)
        users = await self._store.get_users([user_id])
        tokens = await self._start_session(user_id)
        return pb.CreateUserResponse(user=_user_pb(users[user_id]), tokens=tokens)

    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        try:
            slot = await self._throttle.acquire(domain.handle_key(request.handle), _client(context))
        except ResourceExhausted:
            LOGINS.labels("throttled").inc()
            raise
        credentials = await self._store.get_credentials(request.handle)
        # Unknown handle and wrong password take the same path, the same time (a real
        # Argon2id verification either way) and the same answer.
        if credentials is None:
            await self._hasher.verify_unknown(request.password)
            LOGINS.labels("invalid_credentials").inc()
            raise _invalid_credentials()
        if not await self._hasher.verify(credentials.password_hash, request.password):
            LOGINS.labels("invalid_credentials").inc()
            raise _invalid_credentials()
        LOGINS.labels("success").inc()
        await self._throttle.succeeded(slot)
        if self._hasher.needs_rehash(credentials.password_hash):
            # The password is at hand only now: upgrade a hash made with older parameters.
            new_hash = await self._hasher.hash(request.password)
            await self._store.set_password_hash(credentials.user_id, new_hash)
        users = await self._store.get_users([credentials.user_id])
        tokens = await self._start_session(credentials.user_id)
        return pb.LoginResponse(user=_user_pb(users[credentials.user_id]), tokens=tokens)

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Context
    ) -> pb.RefreshTokenResponse:
        now = self._clock()
        new_token, new_hash = new_refresh_token()
        outcome = await self._store.rotate_refresh_token(
            hash_refresh_token(request.refresh_token), new_hash, now
        )
        REFRESHES.labels(outcome.status.value).inc()
        if outcome.status is not domain.RefreshStatus.ROTATED:
            if outcome.status is domain.RefreshStatus.REUSED:
                logger.warning(
                    "refresh token reuse for user %s: session %s revoked",
                    outcome.user_id,
                    outcome.family_id,
                )
            raise domain.refresh_failure(outcome.status)
        assert outcome.user_id and outcome.family_id and outcome.expire_time
        refresh = IssuedToken(new_token, outcome.expire_time)
        access = issue_access_token(
            self._keys.signer(),
            outcome.user_id,
            outcome.family_id,
            now,
            self._settings.access_token_ttl,
        )
        return pb.RefreshTokenResponse(tokens=_tokens_pb(access, refresh))

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> pb.LogoutResponse:
        user_id = domain.caller_user_id(optional_principal())
        result = await self._store.revoke_family(
            hash_refresh_token(request.refresh_token), user_id, self._clock()
        )
        if not result.owned:
            raise PermissionDenied(
                "this refresh token was not issued to you", reason="REFRESH_TOKEN_NOT_OWNED"
            )
        return pb.LogoutResponse()

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(
            keys=[resources_pb.JsonWebKey(**jwk) for jwk in self._keys.jwks()]
        )

    async def _start_session(self, user_id: str) -> resources_pb.AuthTokens:
        """Start a refresh-token family for ``user_id`` and return its first tokens."""
        now = self._clock()
        family_id = domain.new_family_id()
        token, token_hash = new_refresh_token()
        refresh = IssuedToken(token, now + self._settings.refresh_token_ttl)
        await self._store.add_refresh_token(
            token_hash, family_id, user_id, now, refresh.expire_time
        )
        access = issue_access_token(
            self._keys.signer(), user_id, family_id, now, self._settings.access_token_ttl
        )
        return _tokens_pb(access, refresh)

    # -- users -------------------------------------------------------------------------

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        user_id = _resolve(request.name)
        return pb.GetUserResponse(user=_user_pb(await self._get_user(user_id)))

    async def BatchGetUsers(
        self, request: pb.BatchGetUsersRequest, context: Context
    ) -> pb.BatchGetUsersResponse:
        ids = [_resolve(name, "names") for name in request.names]
        found = await self._store.get_users(ids)
        for name, user_id in zip(request.names, ids, strict=True):
            if user_id not in found:
                raise domain.user_not_found(user_id, name=name)
        return pb.BatchGetUsersResponse(users=[_user_pb(found[user_id]) for user_id in ids])

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: Context
    ) -> pb.LookupUserResponse:
        user = await self._store.get_user_by_handle(request.handle)
        if user is None:
            raise NotFound("no account has this handle", reason="USER_NOT_FOUND")
        return pb.LookupUserResponse(user=_user_pb(user))

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        principal = optional_principal()
        user_id = domain.resolve_user(
            domain.parse_user_name(request.user.name, "user.name"), principal
        )
        domain.require_self(user_id, principal, "update the profile")
        changes = domain.profile_changes(
            list(request.update_mask.paths),
            display_name=request.user.display_name,
            bio=request.user.bio,
            avatar_uri=request.user.avatar_uri,
        )
        user = await self._store.update_user(user_id, changes, self._clock())
        if user is None:
            raise domain.user_not_found(user_id)
        return pb.UpdateUserResponse(user=_user_pb(user))

    # -- follow graph ------------------------------------------------------------------

    async def FollowUser(
        self, request: pb.FollowUserRequest, context: Context
    ) -> pb.FollowUserResponse:
        caller, target = self._caller_and_target(request.name)
        domain.check_not_self(caller, target, reason="CANNOT_FOLLOW_SELF", what="follow")
        check = functools.partial(domain.check_follow, max_following=self._settings.max_following)
        try:
            change = await self._store.follow(caller, target, self._clock(), check)
        except UnknownUser as error:
            raise domain.user_not_found(error.user_id) from None
        return pb.FollowUserResponse(relationship=_relationship_pb(caller, target, change.edges))

    async def UnfollowUser(
        self, request: pb.UnfollowUserRequest, context: Context
    ) -> pb.UnfollowUserResponse:
        caller, target = self._caller_and_target(request.name)
        domain.check_not_self(caller, target, reason="CANNOT_FOLLOW_SELF", what="unfollow")
        try:
            change = await self._store.unfollow(caller, target, self._clock())
        except UnknownUser as error:
            raise domain.user_not_found(error.user_id) from None
        return pb.UnfollowUserResponse(relationship=_relationship_pb(caller, target, change.edges))

    async def ListFollowers(
        self, request: pb.ListFollowersRequest, context: Context
    ) -> pb.ListFollowersResponse:
        parent, viewer = await self._listable_parent(request.parent)
        position = domain.decode_page_token(request.page_token, PageQuery.FOLLOWERS, parent)
        size = domain.page_size(request.page_size)
        rows = await self._store.list_followers(parent, viewer, position, size + 1)
        users, token = _page(rows, size, PageQuery.FOLLOWERS, parent)
        return pb.ListFollowersResponse(followers=users, next_page_token=token)

    async def ListFollowing(
        self, request: pb.ListFollowingRequest, context: Context
    ) -> pb.ListFollowingResponse:
        parent, viewer = await self._listable_parent(request.parent)
        position = domain.decode_page_token(request.page_token, PageQuery.FOLLOWING, parent)
        size = domain.page_size(request.page_size)
        rows = await self._store.list_following(parent, viewer, position, size + 1)
        users, token = _page(rows, size, PageQuery.FOLLOWING, parent)
        return pb.ListFollowingResponse(following=users, next_page_token=token)

    async def StreamFollowerIds(
        self, request: pb.StreamFollowerIdsRequest, context: Context
    ) -> AsyncIterator[pb.StreamFollowerIdsResponse]:
        parent = _resolve(request.parent, "parent")
        after = domain.decode_cursor(request.cursor, PageQuery.FOLLOWER_IDS, parent)
        await self._get_user(parent)
        batch = domain.stream_batch_size(request.batch_size)
        response = pb.StreamFollowerIdsResponse
        async for ids, position in self._store.stream_follower_ids(parent, after, batch):
            cursor = domain.encode_cursor(PageQuery.FOLLOWER_IDS, parent, position)
            yield response(follower_ids=ids, cursor=cursor)

    async def StreamFollowingIds(
        self, request: pb.StreamFollowingIdsRequest, context: Context
    ) -> AsyncIterator[pb.StreamFollowingIdsResponse]:
        parent = _resolve(request.parent, "parent")
        after = domain.decode_cursor(request.cursor, PageQuery.FOLLOWING_IDS, parent)
        await self._get_user(parent)
        batch = domain.stream_batch_size(request.batch_size)
        response = pb.StreamFollowingIdsResponse
        async for ids, position in self._store.stream_following_ids(parent, after, batch):
            cursor = domain.encode_cursor(PageQuery.FOLLOWING_IDS, parent, position)
            yield response(following_ids=ids, cursor=cursor)

    async def GetRelationship(
        self, request: pb.GetRelationshipRequest, context: Context
    ) -> pb.GetRelationshipResponse:
        principal = optional_principal()
        subject_segment, other_segment = domain.parse_relationship_name(request.name)
        subject = domain.resolve_user(subject_segment, principal)
        other = domain.resolve_user(other_segment, principal)
        if principal is not None and principal.is_user:
            domain.require_self(subject, principal, "see relationships from a point of view")
        found = await self._store.get_users([subject, other])
        for user_id in (subject, other):
            if user_id not in found:
                raise domain.user_not_found(user_id)
        return pb.GetRelationshipResponse(relationship=await self._relationship(subject, other))

    # -- blocks ------------------------------------------------------------------------

    async def BlockUser(
        self, request: pb.BlockUserRequest, context: Context
    ) -> pb.BlockUserResponse:
        caller, target = self._caller_and_target(request.name)
        domain.check_not_self(caller, target, reason="CANNOT_BLOCK_SELF", what="block")
        try:
            change = await self._store.block(caller, target, self._clock())
        except UnknownUser as error:
            raise domain.user_not_found(error.user_id) from None
        if change.changed:
            logger.info("user %s blocked user %s", caller, target)
        return pb.BlockUserResponse(relationship=_relationship_pb(caller, target, change.edges))

    async def UnblockUser(
        self, request: pb.UnblockUserRequest, context: Context
    ) -> pb.UnblockUserResponse:
        caller, target = self._caller_and_target(request.name)
        domain.check_not_self(caller, target, reason="CANNOT_BLOCK_SELF", what="unblock")
        try:
            change = await self._store.unblock(caller, target, self._clock())
        except UnknownUser as error:
            raise domain.user_not_found(error.user_id) from None
        return pb.UnblockUserResponse(relationship=_relationship_pb(caller, target, change.edges))

    async def ListBlockedUsers(
        self, request: pb.ListBlockedUsersRequest, context: Context
    ) -> pb.ListBlockedUsersResponse:
        principal = optional_principal()
        parent = domain.resolve_user(domain.parse_user_name(request.parent, "parent"), principal)
        domain.require_self(parent, principal, "list the blocked users")
        position = domain.decode_page_token(request.page_token, PageQuery.BLOCKED, parent)
        size = domain.page_size(request.page_size)
        rows = await self._store.list_blocked(parent, position, size + 1)
        users, token = _page(rows, size, PageQuery.BLOCKED, parent)
        return pb.ListBlockedUsersResponse(blocked_users=users, next_page_token=token)

    async def BatchCheckBlocks(
        self, request: pb.BatchCheckBlocksRequest, context: Context
    ) -> pb.BatchCheckBlocksResponse:
        others = list(request.other_user_ids)
        found = await self._store.blocks_among(request.user_id, others)
        checks = [
            pb.BlockCheck(other_user_id=other, blocking=found[other][0], blocked_by=found[other][1])
            for other in others
        ]
        return pb.BatchCheckBlocksResponse(
            checks=checks, any_block=any(c.blocking or c.blocked_by for c in checks)
        )

    # -- host policy -------------------------------------------------------------------

    async def CheckHostEligibility(
        self, request: pb.CheckHostEligibilityRequest, context: Context
    ) -> pb.CheckHostEligibilityResponse:
        user = await self._get_user(_resolve(request.user, "user"))
        verdict = domain.host_eligibility(user.follower_count, self._settings.host_min_followers)
        return pb.CheckHostEligibilityResponse(
            eligible=verdict.eligible,
            reason=_ELIGIBILITY[verdict.reason],
            min_followers=verdict.min_followers,
            follower_count=verdict.follower_count,
        )

    # -- helpers -----------------------------------------------------------------------

    async def _get_user(self, user_id: str) -> User:
        found = await self._store.get_users([user_id])
        if user_id not in found:
            raise domain.user_not_found(user_id)
        return found[user_id]

    def _caller_and_target(self, name: str) -> tuple[str, str]:
        principal = optional_principal()
        caller = domain.caller_user_id(principal)
        return caller, domain.resolve_user(domain.parse_user_name(name), principal)

    async def _listable_parent(self, name: str) -> tuple[str, str | None]:
        """The parent of a follow list, once the caller may see it; and the viewing user.

        :raises NotFound: the parent does not exist.
        :raises PermissionDenied: ``BLOCKED_BY_USER``, the parent blocks the caller.
        """
        principal = optional_principal()
        parent = domain.resolve_user(domain.parse_user_name(name, "parent"), principal)
        await self._get_user(parent)
        viewer = principal.user_id if principal is not None and principal.is_user else None
        if viewer is not None and viewer != parent:
            domain.check_may_list(await self._store.edges(parent, viewer))
        return parent, viewer

    async def _relationship(self, subject: str, other: str) -> resources_pb.Relationship:
        edges = Edges() if subject == other else await self._store.edges(subject, other)
        return _relationship_pb(subject, other, edges)


def _resolve(name: str, field: str = "name") -> str:
    return domain.resolve_user(domain.parse_user_name(name, field), optional_principal())


def _client(context: Context) -> str:
    """The address the call comes from, for throttling (see :func:`client_address`)."""
    principal = optional_principal()
    return client_address(
        context.peer(),
        _metadata_value(context, FORWARDED_FOR_HEADER),
        trusted=principal is not None and principal.is_service,
    )


def _invalid_credentials() -> Unauthenticated:
    return Unauthenticated("the handle or the password is wrong", reason="INVALID_CREDENTIALS")


def _metadata_value(context: Context, key: str) -> str | None:
    for entry_key, value in context.invocation_metadata() or ():
        if entry_key.lower() == key and isinstance(value, str):
            return value
    return None


def _timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _user_pb(user: User) -> resources_pb.User:
    return resources_pb.User(
        name=domain.user_name(user.id),
        id=user.id,
        handle=user.handle,
        display_name=user.display_name,
        bio=user.bio,
        avatar_uri=user.avatar_uri,
        follower_count=user.follower_count,
        following_count=user.following_count,
        create_time=_timestamp(user.create_time),
        update_time=_timestamp(user.update_time),
    )


def _relationship_pb(subject: str, other: str, edges: Edges) -> resources_pb.Relationship:
    return resources_pb.Relationship(
        name=domain.relationship_name(subject, other),
        other_user=domain.user_name(other),
        following=edges.following,
        followed_by=edges.followed_by,
        blocking=edges.blocking,
        blocked_by=edges.blocked_by,
    )


def _summary_pb(user: User) -> resources_pb.UserSummary:
    return resources_pb.UserSummary(
        name=domain.user_name(user.id),
        handle=user.handle,
        display_name=user.display_name,
        avatar_uri=user.avatar_uri,
    )


def _page(
    rows: Sequence[tuple[int, User]], size: int, query: PageQuery, parent: str
) -> tuple[list[resources_pb.UserSummary], str]:
    """The summaries of one page (rows holds one extra when there is a next page)."""
    page = rows[:size]
    token = ""
    if len(rows) > size and page:
        token = domain.encode_page_token(query, parent, page[-1][0])
    return [_summary_pb(user) for _, user in page], token


def _tokens_pb(access: IssuedToken, refresh: IssuedToken) -> resources_pb.AuthTokens:
    return resources_pb.AuthTokens(
        access_token=access.token,
        access_token_expire_time=_timestamp(access.expire_time),
        refresh_token=refresh.token,
        refresh_token_expire_time=_timestamp(refresh.expire_time),
    )

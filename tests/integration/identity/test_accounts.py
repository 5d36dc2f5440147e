"""Sign-up, profiles and lookups through the real gRPC server."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from spaces.identity.v1 import identity_events_pb2 as events_pb
from spaces.identity.v1 import identity_resources_pb2 as resources_pb
from spaces.identity.v1 import identity_service_pb2 as pb

from tests.integration.identity.harness import PASSWORD, Identity, bearer, detail, reason


def create_request(
    handle: str,
    request_id: str | None = None,
    *,
    password: str = PASSWORD,
    display_name: str = "Al",
    bio: str = "",
    avatar_uri: str = "",
) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(
        user=resources_pb.User(
            handle=handle, display_name=display_name, bio=bio, avatar_uri=avatar_uri
        ),
        password=password,
        request_id=request_id or str(uuid.uuid4()),
    )


async def test_sign_up_returns_the_profile_and_a_working_session(identity: Identity) -> None:
    response = await identity.stub.CreateUser(
        create_request(
            "Alice_01", display_name="Alice", bio="hi", avatar_uri="https://img.example/a.png"
        )
    )
    user = response.user
    assert user.name == f"users/{user.id}" and len(user.id) == 26
    assert (user.handle, user.display_name, user.bio) == ("Alice_01", "Alice", "hi")
    assert user.avatar_uri == "https://img.example/a.png"
    assert user.create_time == user.update_time and user.create_time.seconds > 0
    assert response.tokens.access_token and response.tokens.refresh_token.startswith("rt_")

    me = await identity.stub.GetUser(
        pb.GetUserRequest(name="users/me"), metadata=bearer(response.tokens.access_token)
    )
    assert me.user == user

    [(stored_hash,)] = await identity.sql("SELECT password_hash FROM users")
    assert stored_hash.startswith("$argon2id$") and PASSWORD not in stored_hash


@pytest.mark.parametrize(
    ("handle", "field"),
    [
        ("", "user"),  # required
        ("sixteen_chars_xx", "user.handle"),
        ("bad-dash", "user.handle"),
        ("ünicode", "user.handle"),
        ("with space", "user.handle"),
    ],
)
async def test_sign_up_refuses_bad_handles(identity: Identity, handle: str, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.CreateUser(create_request(handle))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(caught.value, error_details_pb2.BadRequest)
    assert bad is not None and [v.field for v in bad.field_violations] == [field]


async def test_sign_up_accepts_the_longest_handle_and_checks_the_rest(identity: Identity) -> None:
    await identity.stub.CreateUser(create_request("a" * 15))
    bad = [
        create_request("short_pw", password="1234567"),
        create_request("no_name", display_name=""),
        create_request("long_name", display_name="x" * 51),
        create_request("long_bio", bio="x" * 161),
        create_request("http_avatar", avatar_uri="http://img.example/a.png"),
        create_request("bad_request_id", request_id="not-a-uuid"),
    ]
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.CreateUser(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request.user.handle


async def test_duplicate_handle_ignoring_case_is_already_exists(identity: Identity) -> None:
    await identity.signup("Alice")
    for spelling in ("Alice", "alice", "ALICE"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.signup(spelling)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert reason(caught.value) == "HANDLE_TAKEN"
    assert await identity.sql("SELECT count(*) FROM users") == [(1,)]


async def test_create_user_is_idempotent_by_request_id(identity: Identity) -> None:
    request_id = str(uuid.uuid4())
    first = await identity.stub.CreateUser(create_request("bob", request_id))
    again = await identity.stub.CreateUser(create_request("bob", request_id))
    assert again.user.id == first.user.id
    assert again.tokens.refresh_token != first.tokens.refresh_token  # a fresh session

    for different in (
        create_request("bob", request_id, display_name="Robert"),
        create_request("bobby", request_id),
        create_request("bob", request_id, password="another password"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.CreateUser(different)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"
    assert await identity.sql("SELECT count(*) FROM users") == [(1,)]


async def test_concurrent_retries_of_one_sign_up_make_one_account(identity: Identity) -> None:
    request = create_request("racer", str(uuid.uuid4()))
    responses = await asyncio.gather(*(identity.stub.CreateUser(request) for _ in range(5)))
    assert len({r.user.id for r in responses}) == 1
    assert await identity.sql("SELECT count(*) FROM users") == [(1,)]


async def test_sign_up_emits_user_created(identity: Identity) -> None:
    user, _ = await identity.signup("Carol")
    [event] = await identity.events(1)
    assert (event.type, event.key) == ("user.created", f"users/{user.id}")
    payload = event.unpack(events_pb.UserCreatedEvent)
    assert (payload.user_id, payload.handle) == (user.id, "Carol")


async def test_get_batch_get_and_lookup(identity: Identity) -> None:
    alice, tokens = await identity.signup("Alice")
    bob, _ = await identity.signup("bob")
    auth = bearer(tokens.access_token)

    got = await identity.stub.GetUser(pb.GetUserRequest(name=bob.name), metadata=auth)
    assert got.user == bob
    batch = await identity.stub.BatchGetUsers(
        pb.BatchGetUsersRequest(names=[bob.name, "users/me", bob.name]), metadata=auth
    )
    assert [u.id for u in batch.users] == [bob.id, alice.id, bob.id]
    looked_up = await identity.stub.LookupUser(pb.LookupUserRequest(handle="ALICE"), metadata=auth)
    assert looked_up.user.id == alice.id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.BatchGetUsers(
            pb.BatchGetUsersRequest(names=[bob.name, "users/nobody", "users/ghost"]),
            metadata=auth,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = detail(caught.value, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "USER_NOT_FOUND"
    assert info.metadata["name"] == "users/nobody"

    for call in (
        identity.stub.GetUser(pb.GetUserRequest(name="users/nobody"), metadata=auth),
        identity.stub.LookupUser(pb.LookupUserRequest(handle="nobody"), metadata=auth),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert (caught.value.code(), reason(caught.value)) == (
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
        )


async def test_reads_need_a_token_and_me_needs_a_user(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.GetUser(pb.GetUserRequest(name="users/me"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.GetUser(
            pb.GetUserRequest(name="users/me"), metadata=identity.service_metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == "ME_WITHOUT_USER"


async def test_update_user_changes_listed_fields_of_oneself_only(identity: Identity) -> None:
    alice, tokens = await identity.signup("alice", bio="old bio")
    bob, bob_tokens = await identity.signup("bob")
    auth = bearer(tokens.access_token)

    updated = await identity.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=resources_pb.User(name="users/me", display_name="Alice A.", bio="ignored"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=auth,
    )
    assert (updated.user.display_name, updated.user.bio) == ("Alice A.", "old bio")
    assert updated.user.update_time.ToDatetime() > alice.update_time.ToDatetime()
    assert updated.user.handle == "alice"

    cleared = await identity.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=resources_pb.User(name=alice.name),
            update_mask=field_mask_pb2.FieldMask(paths=["bio", "avatar_uri"]),
        ),
        metadata=auth,
    )
    assert (cleared.user.bio, cleared.user.avatar_uri) == ("", "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=resources_pb.User(name=bob.name, display_name="Hacked"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=auth,
        )
    assert (caught.value.code(), reason(caught.value)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_SELF",
    )
    for bad_mask in (["handle"], []):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.UpdateUser(
                pb.UpdateUserRequest(
                    user=resources_pb.User(name="users/me", display_name="B"),
                    update_mask=field_mask_pb2.FieldMask(paths=bad_mask),
                ),
                metadata=bearer(bob_tokens.access_token),
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_user_cannot_clear_the_display_name(identity: Identity) -> None:
    _, tokens = await identity.signup("bob")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=resources_pb.User(name="users/me", display_name=""),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=bearer(tokens.access_token),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

"""Join links, page tokens and media grants: signed, expiring, unforgeable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import ServiceError
from services.common.grants import MediaGrantSigner, MediaGrantVerifier
from services.rooms.tokens import JoinLinks, PageTokens

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = b"k" * 32


def test_join_link_round_trip_and_failures() -> None:
    links = JoinLinks(KEY, "https://x/join")
    token, uri, expires = links.issue("s1", timedelta(hours=1), NOW)
    assert uri == f"https://x/join?token={token}"
    assert expires == NOW + timedelta(hours=1)
    links.check(token, "s1", NOW)
    with pytest.raises(ServiceError) as caught:
        links.check(token, "s2", NOW)
    assert caught.value.reason == "JOIN_LINK_INVALID"
    with pytest.raises(ServiceError) as caught:
        links.check(token, "s1", NOW + timedelta(hours=2))
    assert caught.value.reason == "JOIN_LINK_EXPIRED"
    forged = JoinLinks(b"x" * 32, "https://x/join").issue("s1", timedelta(hours=1), NOW)[0]
    for bad in (forged, "", "abc", "a.b", token + "x"):
        with pytest.raises(ServiceError) as caught:
            links.check(bad, "s1", NOW)
        assert caught.value.reason == "JOIN_LINK_INVALID"


def test_page_tokens_are_bound_to_their_query() -> None:
    pages = PageTokens(KEY)
    token = pages.issue_after("q", (4, 40, "u"), NOW)
    assert pages.after(token, "q", NOW, None) == (4, 40, "u")
    for query, now in (("other", NOW), ("q", NOW + timedelta(minutes=11))):
        with pytest.raises(ServiceError) as caught:
            pages.after(token, query, now, timedelta(minutes=10))
        assert caught.value.reason == "PAGE_TOKEN_INVALID"
    # Join links and page tokens share a key but never pass for each other.
    link = JoinLinks(KEY, "https://x").issue("s1", timedelta(hours=1), NOW)[0]
    with pytest.raises(ServiceError):
        pages.after(link, "q", NOW, None)


def test_media_grant_round_trip() -> None:
    secret = "s" * 40
    token, grant = MediaGrantSigner(secret).sign(
        space_id="s1", user_id="u1", role="speaker", may_publish=True, node="media-3"
    )
    verified = MediaGrantVerifier(secret).verify(token)
    assert verified == grant
    with pytest.raises(ServiceError) as caught:
        MediaGrantVerifier("t" * 40).verify(token)
    assert caught.value.reason == "GRANT_INVALID"
    with pytest.raises(ServiceError) as caught:
        MediaGrantVerifier(secret).verify(token, now=grant.expire_time.timestamp() + 60)
    assert caught.value.reason == "GRANT_EXPIRED"
    with pytest.raises(ValueError):
        MediaGrantSigner("short")


def test_keyset_page_tokens_round_trip_and_refuse_everything_else() -> None:
    pages = PageTokens(KEY)
    token = pages.issue_after("q", (0, -1_700_000_000_000_000, "abc"), NOW)
    assert pages.after(token, "q", NOW, None) == (0, -1_700_000_000_000_000, "abc")
    assert pages.after("", "q", NOW, None) is None
    other_key = PageTokens(b"x" * 32).issue_after("q", (0, 1, "a"), NOW)
    # A token of the offset paging this replaced, signed with the right key.
    offset_token = pages._signer.sign({"q": "q", "o": 5, "t": int(NOW.timestamp())})
    bad = [token[:-2], "garbage", f"{token}x", other_key, offset_token, "a.b", "."]
    for candidate in bad:
        with pytest.raises(ServiceError) as caught:
            pages.after(candidate, "q", NOW, None)
        assert caught.value.reason == "PAGE_TOKEN_INVALID", candidate
    with pytest.raises(ServiceError):
        pages.after(token, "another query", NOW, None)
    with pytest.raises(ServiceError):
        pages.after(token, "q", NOW + timedelta(hours=1), timedelta(minutes=10))

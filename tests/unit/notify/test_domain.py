"""Notify's pure rules: signatures, backoff, address policy, ownership, page tokens."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest
from pydantic import ValidationError
from spaces.notify.v1 import notify_resources_pb2 as res

from services.common.auth import Principal
from services.common.errors import InvalidArgument, PermissionDenied
from services.notify import domain
from services.notify.settings import NotifySettings


def test_signature_round_trip_and_replay_window() -> None:
    body = b'{"delivery":"users/u/webhooks/w/deliveries/1"}'
    now = time.time()
    header = domain.signature_header("whsec_x", body, now=now)
    assert header.startswith(f"t={int(now)},v1=")
    assert domain.verify_signature("whsec_x", header, body, now=now + 10)
    assert not domain.verify_signature("whsec_y", header, body, now=now)
    assert not domain.verify_signature("whsec_x", header, body + b" ", now=now)
    assert not domain.verify_signature("whsec_x", header, body, now=now + 301)
    assert not domain.verify_signature("whsec_x", "garbage", body, now=now)


def test_signature_is_hmac_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert domain.sign_payload("k", 1700000000, b"{}") == expected


def test_backoff_doubles_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    delays = [domain.backoff_delay(n, base_s=1, cap_s=8, rng=rng) for n in range(1, 7)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(8, 2 ** (attempt - 1))
        assert nominal / 2 <= delay <= nominal
    with pytest.raises(ValueError):
        domain.backoff_delay(0, base_s=1, cap_s=8)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert domain.is_public_address(address) is public


def test_owner_resolution() -> None:
    alice = Principal.user("alice")
    assert domain.resolve_owner("users/me", alice) == "alice"
    assert domain.resolve_owner("users/alice", alice) == "alice"
    with pytest.raises(PermissionDenied) as denied:
        domain.resolve_owner("users/bob", alice)
    assert denied.value.reason == "NOT_OWNER"
    rooms = Principal.service("rooms")
    assert domain.resolve_owner("users/bob", rooms) == "bob"
    with pytest.raises(InvalidArgument):
        domain.resolve_owner("users/me", rooms)


def test_page_tokens_are_bound_to_listing_and_owner() -> None:
    token = domain.encode_page_token("inbox", "alice", "42")
    assert domain.decode_page_token(token, "inbox", "alice") == "42"
    assert domain.decode_page_token("", "inbox", "alice") is None
    for kind, owner in (("inbox", "bob"), ("webhooks", "alice")):
        with pytest.raises(InvalidArgument) as bad:
            domain.decode_page_token(token, kind, owner)
        assert bad.value.reason == "PAGE_TOKEN_INVALID"


def test_reminder_fire_times() -> None:
    start = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
    lead = dt.timedelta(minutes=10)
    early = start - dt.timedelta(days=1)
    assert domain.reminder_fire_time(res.REMINDER_KIND_HOST, start, lead, early) == start
    assert domain.reminder_fire_time(res.REMINDER_KIND_SUBSCRIBER, start, lead, early) == (
        start - lead
    )
    late = start - dt.timedelta(minutes=1)
    assert domain.reminder_fire_time(res.REMINDER_KIND_SUBSCRIBER, start, lead, late) == late


def test_preferences_filter() -> None:
    kind = res.NOTIFICATION_KIND_SPACE_STARTED
    assert domain.allowed_by_preferences(kind, "host", [], [])
    assert not domain.allowed_by_preferences(kind, "host", [kind], [])
    assert not domain.allowed_by_preferences(kind, "host", [], ["host"])
    assert domain.allowed_by_preferences(kind, "", [], ["host"])


def test_fanout_wording() -> None:
    template = domain.fanout_draft(res.NOTIFICATION_KIND_SPACE_STARTED, "h", "s", "Jazz", "Ada")
    assert (template.title, template.body, template.dedupe_key) == (
        "Ada is hosting",
        "Jazz",
        "started:s",
    )
    anonymous = domain.fanout_draft(res.NOTIFICATION_KIND_SPACE_SCHEDULED, "h", "s", "", "")
    assert anonymous.title == "Someone you follow scheduled a Space"


def test_webhook_disabled_notice() -> None:
    when = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    draft = domain.webhook_disabled_draft("u1", "w1", "https://x.example/hook", "3 failed", when)
    assert draft.user_id == "u1"
    assert draft.kind == res.NOTIFICATION_KIND_WEBHOOK_DISABLED
    assert draft.subject == "users/u1/webhooks/w1"
    assert draft.body == "https://x.example/hook: 3 failed"
    # One notice per disabling: a later disabling of the same webhook is a new notice.
    later = domain.webhook_disabled_draft(
        "u1", "w1", "https://x.example/hook", "3 failed", when.replace(hour=13)
    )
    assert later.dedupe_key != draft.dedupe_key


def test_settings_refuse_keeping_notifications_shorter_than_deliveries() -> None:
    with pytest.raises(ValidationError):
        NotifySettings(
            _env_file=None,  # type: ignore[call-arg]
            retention_notifications=dt.timedelta(days=1),
            retention_deliveries=dt.timedelta(days=2),
        )
    settings = NotifySettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.retention_notifications == dt.timedelta(days=90)
    assert settings.webhook_disable_after_failures == 100
    assert settings.fanout_writers == 2

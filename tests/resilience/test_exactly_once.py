"""Crash a service in the middle of a bulk job; its effects still happen exactly once.

* payments: a ticketed Space with 80 sold tickets is canceled (rooms' SpaceCanceledEvent
  makes payments refund every ticket); payments is SIGKILLed once some but not all refunds
  reached the card processor, then started again. Every ticket ends REFUNDED, each charge
  has exactly one processor refund of its full amount, the ledger holds exactly one refund
  entry per ticket, and the host's held balance is back to zero.
* notify: a host with 400 followers goes live (SpaceStartedEvent, fanned out to the
  followers in batches); notify is SIGKILLed once some but not all followers were
  notified, then started again. Every follower ends with exactly one "is hosting"
  notification for that Space.

The stack runs with knobs that stretch the jobs so that the kill lands in the middle:
20 ms of sandbox processor latency, fan-out batches of 20 with a pause between them and a
3 s lease (how soon another worker takes a crashed worker's job over).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from google.protobuf import timestamp_pb2
from spaces.common.v1 import money_pb2
from spaces.payments.v1 import payments_resources_pb2 as payments_res
from spaces.rooms.v1 import rooms_resources_pb2 as rooms_res

from tests.resilience.harness import (
    FAST_PASSWORDS,
    Api,
    User,
    create_live_space,
    eventually_ok,
    running_stack,
    signup,
)
from tools.devstack import Stack

pytestmark = pytest.mark.resilience

TICKETS = 80
FOLLOWERS = 400


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("once")
    env = {
        **FAST_PASSWORDS,
        "PAYMENTS_SANDBOX_LATENCY_MS": "20",
        "NOTIFY_FANOUT_BATCH_SIZE": "20",
        "NOTIFY_FANOUT_SLICE_BATCHES": "1",
        "NOTIFY_FANOUT_BATCH_PAUSE_S": "0.1",
        "NOTIFY_FANOUT_LEASE_S": "3",
    }
    with running_stack(run_dir, extra_env=env) as running:
        yield running


async def _gather_limited(coros: list, limit: int = 16) -> list:  # type: ignore[type-arg]
    semaphore = asyncio.Semaphore(limit)

    async def one(coro):  # type: ignore[no-untyped-def]
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


def _query(stack: Stack, sql: str, *args: object) -> list[tuple]:  # type: ignore[type-arg]
    with psycopg.connect(stack.database_url) as conn:
        return conn.execute(sql, args).fetchall()


async def _wait_for_count(
    stack: Stack, sql: str, args: tuple[object, ...], low: int, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = int(await asyncio.to_thread(lambda: _query(stack, sql, *args)[0][0]))
        if count >= low:
            return count
        await asyncio.sleep(0.02)
    raise AssertionError(f"count never reached {low}")


async def test_payments_killed_during_a_mass_refund(stack: Stack, api: Api) -> None:
    host = await signup(api, "rfhost")
    when = timestamp_pb2.Timestamp()
    when.FromSeconds(int(time.time() + timedelta(days=2).total_seconds()))
    created = await api.ok(
        "RoomsService.CreateSpace",
        token=host.token,
        space=rooms_res.Space(title="refund me", ticketed=True, scheduled_start_time=when),
        request_id=str(uuid.uuid4()),
    )
    space = created.space.name
    # Signed up meanwhile, so payments has long learned of the Space from rooms' events.
    buyers: list[User] = await _gather_limited([signup(api, f"b{i}") for i in range(TICKETS)])
    price = money_pb2.Money(amount_minor=1000, currency_code="USD")
    # Payments learns of the Space from rooms' events, a moment later.
    await eventually_ok(
        api,
        "PaymentsService.CreateTicketOffering",
        timeout=30,
        token=host.token,
        parent=space,
        ticket_offering=payments_res.TicketOffering(price=price, capacity=TICKETS),
        request_id=str(uuid.uuid4()),
    )
    await _gather_limited(
        [
            api.ok(
                "PaymentsService.PurchaseTicket",
                token=b.token,
                parent=space,
                request_id=str(uuid.uuid4()),
                payment_method="tok_visa",
                price=price,
            )
            for b in buyers
        ]
    )
    space_id = space.split("/")[1]
    refunds_sql = (
        "SELECT count(*) FROM payments.sandbox_refunds r"
        " JOIN payments.tickets t ON t.charge_id = r.charge_id WHERE t.space_id = %s"
    )

    canceled_at = time.monotonic()
    await api.ok("RoomsService.CancelSpace", token=host.token, name=space)
    done_before_kill = await _wait_for_count(stack, refunds_sql, (space_id,), 1, 20)
    await asyncio.to_thread(stack.kill_service, "payments")
    killed_after = time.monotonic() - canceled_at
    done_at_kill = int(_query(stack, refunds_sql, space_id)[0][0])
    await asyncio.to_thread(stack.start_service, "payments")
    await _wait_for_count(stack, refunds_sql, (space_id,), TICKETS, 60)
    # Let any duplicate attempt (there must be none) land before counting.
    await asyncio.sleep(2.0)
    finished_s = time.monotonic() - canceled_at

    tickets = _query(
        stack,
        "SELECT t.state, count(*) FROM payments.tickets t WHERE t.space_id = %s GROUP BY 1",
        space_id,
    )
    per_charge = _query(
        stack,
        "SELECT c.id, c.amount_minor, c.refunded_minor, count(r.id)"
        " FROM payments.tickets t JOIN payments.sandbox_charges c ON c.id = t.charge_id"
        " LEFT JOIN payments.sandbox_refunds r ON r.charge_id = c.id"
        " WHERE t.space_id = %s GROUP BY c.id",
        space_id,
    )
    refund_entries = _query(
        stack,
        "SELECT count(*) FROM payments.journal_entries e"
        " JOIN payments.tickets t ON e.dedupe_key = 'refund:' || t.id WHERE t.space_id = %s",
        space_id,
    )
    balance = await api.ok(
        "PaymentsService.GetBalance", token=host.token, name=f"{host.name}/balance"
    )
    held = sum(b.held.amount_minor for b in balance.balance.balances)
    print(
        f"\npayments kill: {TICKETS} tickets; killed {killed_after:.2f} s after the cancel with"
        f" {done_at_kill} refunds at the processor (first seen {done_before_kill}); all refunded"
        f" {finished_s:.1f} s after the cancel; ticket states {dict(tickets)};"
        f" refunds per charge {sorted({row[3] for row in per_charge})};"
        f" ledger refund entries {refund_entries[0][0]}; host held {held}"
    )
    assert 0 < done_at_kill < TICKETS, "the kill did not land in the middle of the refunds"
    assert dict(tickets) == {"refunded": TICKETS}
    assert len(per_charge) == TICKETS
    assert all(row[3] == 1 and row[2] == row[1] for row in per_charge), per_charge
    assert refund_entries[0][0] == TICKETS
    assert held == 0


async def test_notify_killed_during_a_fan_out(stack: Stack, api: Api) -> None:
    host = await signup(api, "fohost")
    followers: list[User] = await _gather_limited([signup(api, f"f{i}") for i in range(FOLLOWERS)])
    await _gather_limited(
        [api.ok("IdentityService.FollowUser", token=f.token, name=host.name) for f in followers]
    )
    started_at = time.monotonic()
    space_id = await create_live_space(api, host, title="fan me out")
    space = f"spaces/{space_id}"
    count_sql = "SELECT count(*) FROM notify.notifications WHERE space = %s AND kind = 1"
    first_seen = await _wait_for_count(stack, count_sql, (space,), 1, 30)
    await asyncio.to_thread(stack.kill_service, "notify")
    killed_after = time.monotonic() - started_at
    at_kill = int(_query(stack, count_sql, space)[0][0])
    await asyncio.to_thread(stack.start_service, "notify")
    await _wait_for_count(stack, count_sql, (space,), FOLLOWERS, 60)
    await asyncio.sleep(2.0)
    finished_s = time.monotonic() - started_at
    per_user = _query(
        stack,
        "SELECT user_id, count(*) FROM notify.notifications WHERE space = %s AND kind = 1"
        " GROUP BY user_id",
        space,
    )
    counts = {row[0]: row[1] for row in per_user}
    # Two followers' inboxes through the API, as the apps read them.
    for follower in (followers[0], followers[-1]):
        inbox = await api.ok(
            "NotifyService.ListNotifications", token=follower.token, parent=follower.name
        )
        assert [n.space for n in inbox.notifications].count(space) == 1
    print(
        f"\nnotify kill: {FOLLOWERS} followers; killed {killed_after:.2f} s after going live"
        f" with {at_kill} notified (first seen {first_seen}); all notified {finished_s:.1f} s"
        f" after going live; notifications per follower {sorted(set(counts.values()))}"
    )
    assert 0 < at_kill < FOLLOWERS, "the kill did not land in the middle of the fan-out"
    assert set(counts) == {f.id for f in followers}
    assert set(counts.values()) == {1}

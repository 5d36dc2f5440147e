"""The Space projection built from rooms' events: at-least-once and out-of-order delivery
change nothing they should not."""

from __future__ import annotations

import datetime as dt

from spaces.payments.v1 import payments_resources_pb2 as res
from spaces.payments.v1 import payments_service_pb2 as pb
from spaces.rooms.v1 import rooms_events_pb2 as rooms_events

from services.common import outbox
from tests.integration.payments.conftest import PaymentsHarness, scalar, ticketed_space, timestamp


async def test_reschedule_moves_the_default_sales_end(harness: PaymentsHarness) -> None:
    h = harness
    space = await ticketed_space(h)
    later = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=3)
    await h.rooms.send(
        "space.rescheduled",
        f"spaces/{space}",
        rooms_events.SpaceRescheduledEvent(
            space_id=space, host_id="host", new_scheduled_start_time=timestamp(later)
        ),
    )
    offering = await h.stub.GetTicketOffering(
        pb.GetTicketOfferingRequest(name=f"spaces/{space}/ticketOffering"),
        metadata=h.as_.user("x"),
    )
    assert offering.ticket_offering.sales_end_time.ToDatetime(tzinfo=dt.UTC) == later


async def test_late_and_repeated_events_do_not_move_a_space_back(
    harness: PaymentsHarness,
) -> None:
    h = harness
    # Started arrives before Scheduled (a retried delivery came late).
    await h.rooms.start("odd", "host")
    await h.rooms.schedule("odd", "host")
    assert await scalar(h, "SELECT state FROM spaces WHERE id = 'odd'") == "live"
    await h.rooms.end("odd", "host")
    await h.rooms.start("odd", "host")
    await h.rooms.cancel("odd", "host")
    assert await scalar(h, "SELECT state FROM spaces WHERE id = 'odd'") == "ended"
    # The same event delivered twice is applied once.
    event_id = await h.rooms.publish(
        "space.scheduled",
        "spaces/dup",
        rooms_events.SpaceScheduledEvent(space_id="dup", host_id="host"),
    )
    await h.rooms.applied(event_id)
    # Relayed again under the same event id (as after a producer-side retry).
    async with h.rooms.pool.connection() as conn, conn.transaction():
        await outbox.append(
            conn,
            "space.scheduled",
            "spaces/dup",
            rooms_events.SpaceScheduledEvent(space_id="dup", host_id="someone-else"),
            event_id=event_id,
        )
    await h.rooms.schedule("after-dup", "host")  # processed after the duplicate
    assert await scalar(h, "SELECT host_id FROM spaces WHERE id = 'dup'") == "host"
    assert await scalar(h, "SELECT count(*) FROM processed_events") == 7


async def test_ended_space_without_tickets_settles_nothing(harness: PaymentsHarness) -> None:
    h = harness
    await h.rooms.schedule("free", "host")
    await h.rooms.start("free", "host")
    await h.rooms.end("free", "host")
    settled = await h.stub.SettleSpaceRevenue(
        pb.SettleSpaceRevenueRequest(space="spaces/free"), metadata=h.as_.service()
    )
    assert list(settled.settled_amounts) == []
    check = await h.stub.CheckTicket(
        pb.CheckTicketRequest(space="spaces/free", user="users/bob"), metadata=h.as_.service()
    )
    assert (check.ticket_required, check.has_ticket) == (False, False)
    assert res.TicketOffering.STATE_SETTLED  # the enum exists for settled offerings

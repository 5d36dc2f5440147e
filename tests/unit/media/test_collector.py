"""The media node's collector policy: joined sessions are frozen out of full collections,
and what closed sessions left in cycles is reclaimed after the configured number of them."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.media.collector import CollectorPolicy


class Node:
    """An object in a reference cycle (as aiortc's are)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Leave the process as it was: nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_sessions_are_frozen_after_they_open_and_cycles_reclaimed_after_enough_close() -> None:
    policy = CollectorPolicy(enabled=True, unfreeze_after_closed=3, interval_s=0)
    live = Node()
    policy.opened()
    policy.tick(now=1.0)
    assert gc.get_freeze_count() > 0, "the joined session is frozen"
    frozen_before = gc.get_freeze_count()

    # A session that closes after it was frozen leaves its cycle in the frozen set.
    closing = Node()
    policy.opened()
    policy.tick(now=2.0)
    left = weakref.ref(closing)
    del closing
    gc.collect()
    assert left() is not None, "frozen: full collections leave it"
    assert gc.get_freeze_count() >= frozen_before

    for _ in range(2):
        policy.closed()
    policy.tick(now=3.0)
    assert left() is not None, "not yet: two closed, the budget is three"
    policy.closed()
    policy.tick(now=4.0)
    assert left() is None, "reclaimed once three sessions closed"
    assert live.me is live and gc.get_freeze_count() > 0, "what lives is frozen again"

    policy.close()
    assert gc.get_freeze_count() == 0


def test_nothing_happens_when_disabled_or_before_the_interval() -> None:
    off = CollectorPolicy(enabled=False)
    off.opened()
    off.tick(now=100.0)
    assert gc.get_freeze_count() == 0
    policy = CollectorPolicy(enabled=True, interval_s=10.0)
    policy.opened()
    policy.tick(now=100.0)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    young = Node()
    policy.opened()
    policy.tick(now=105.0)
    assert gc.get_freeze_count() == frozen, "within the interval: no new freeze"
    policy.tick(now=111.0)
    assert gc.get_freeze_count() > frozen, "then the new session is frozen too"
    assert young.me is young
    policy.close()
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError):
        CollectorPolicy(enabled=True, unfreeze_after_closed=0)

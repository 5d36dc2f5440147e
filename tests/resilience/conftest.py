"""Fixtures of the resilience scenarios: the real stack (one shared by the modules with
default settings; a module needing other settings overrides ``stack``). Every module is
marked ``resilience``: ``make test`` skips them, ``make test-resilience`` runs them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.resilience.harness import Api, running_stack
from tools.devstack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack with default settings, shared by the modules that do not need their
    own (each scenario brings back whatever it killed or stopped)."""
    run_dir: Path = tmp_path_factory.mktemp("stack")
    with running_stack(run_dir) as running:
        yield running


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[Api]:
    client = Api(stack)
    try:
        yield client
    finally:
        await client.close()

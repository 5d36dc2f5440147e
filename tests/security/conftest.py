"""One real stack (the processes ``make up`` starts) shared by the security tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.resilience.harness import running_stack
from tools.devstack import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("security")
    with running_stack(run_dir) as running:
        yield running

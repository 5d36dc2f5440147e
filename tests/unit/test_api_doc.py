"""docs/api.md must be what tools/apidoc.py makes of the current protos."""

from __future__ import annotations

import difflib

import pytest

from tools import apidoc, protodesc


def test_api_doc_is_current() -> None:
    try:
        fds = protodesc.load_descriptor_set()
    except FileNotFoundError as missing:
        pytest.fail(str(missing))
    expected = apidoc.render(fds)
    actual = apidoc.OUTPUT.read_text() if apidoc.OUTPUT.exists() else ""
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                "docs/api.md (committed)",
                "docs/api.md (from the protos)",
                n=1,
            )
        )
        pytest.fail(f"docs/api.md is stale: run make docs\n{diff[:4000]}", pytrace=False)

"""Fail if the protos break clients of the previous commit of main (``buf breaking``).

The baseline is ``HEAD~1`` (``BUF_AGAINST`` overrides it, e.g. ``origin/main``): its
``protos/`` are compiled to a descriptor set in a temporary folder and compared with
``build/spaces.binpb``. A checkout without that commit (a shallow clone, the first commit,
or a baseline without protos) has nothing to break, and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tools.protogen import BUILD, DESCRIPTOR_SET, ROOT, build_descriptor_set

BUF = ROOT / "node_modules" / ".bin" / "buf"


def export_protos(ref: str, into: Path) -> bool:
    """Write ``protos/`` as it was at ``ref`` into ``into``; False if there is none."""
    probe = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}:protos"],
        cwd=ROOT,
        capture_output=True,
    )
    if probe.returncode != 0:
        return False
    archive = into / "protos.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", f"--output={archive}", ref, "protos"],
        cwd=ROOT,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return True


def main() -> int:
    ref = os.environ.get("BUF_AGAINST", "HEAD~1")
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        folder = Path(tmp)
        if not export_protos(ref, folder):
            print(f"buf breaking: no protos at {ref}; nothing to compare against")
            return 0
        against = folder / "against.binpb"
        if build_descriptor_set(folder / "protos", against) != 0:
            print(f"buf breaking: the protos at {ref} do not compile; skipping comparison")
            return 0
        result = subprocess.run(
            [
                str(BUF),
                "breaking",
                str(DESCRIPTOR_SET),
                "--against",
                str(against),
                "--path",
                "spaces",
                "--config",
                str(ROOT / "buf.yaml"),
            ],
            cwd=ROOT,
        )
        if result.returncode == 0:
            print(f"buf breaking: no breaking change against {ref}")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())

"""Run every ``bench/*.py`` and collect their results: ``make bench``.

Each benchmark is run as its own process with ``BENCH_RESULTS_DIR`` set (where it may
write plots); its last stdout line must be one JSON object. The runner writes
``bench/results/latest.json`` ({benchmark: result}) and prints a summary table.
``make bench BENCH=media_fanout`` runs only the named ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"


def run_one(path: Path) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS_DIR": str(RESULTS)},
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {
            "error": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:],
            "wall_s": round(elapsed, 2),
        }
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "last line is not JSON", "last_line": lines[-1][:500]}
    if not isinstance(result, dict):
        return {"error": "last line is not a JSON object"}
    result.setdefault("wall_s", round(elapsed, 2))
    return result


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, result in results.items():
        lines.append(f"== {name}")
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:,.4g}"
            lines.append(f"  {key:<36} {value}")
    return "\n".join(lines)


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, os.environ.get("BENCH", "").split(",")))
    paths = sorted(p for p in BENCH.glob("*.py") if not wanted or p.stem in wanted)
    if not paths:
        print("no benchmarks found under bench/")
        return 0
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        results[path.stem] = run_one(path)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(summary(results))
    print(f"\nwritten: {RESULTS / 'latest.json'}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

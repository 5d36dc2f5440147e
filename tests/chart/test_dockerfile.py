"""The image build, checked without a Docker engine (none runs here): the Dockerfile's
stages, user, command and copied paths; what .dockerignore leaves in the context; and that
the runtime dependencies it installs cover everything ``services/`` imports."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.chart.support import ROOT

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|apt-get|uv|pip|protoc|mypy)\b")


@dataclass
class Stage:
    """One ``FROM`` ... up to the next ``FROM``."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Split a Dockerfile into global ARG defaults and stages (line continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif keyword == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context (last matching rule wins)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, bare) for prefix in prefixes):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_multi_stage_build_with_a_minimal_final_stage(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = dockerfile
    assert [s.name for s in stages] == ["deps", "protos", "runtime"]
    final = stages[-1]
    # The final stage starts from the plain Python image, not from a stage with tools in it.
    assert final.base == "${PYTHON_IMAGE}" and stages[0].base == "${PYTHON_IMAGE}"
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    for run in final.arguments("RUN"):
        assert not BUILD_TOOLS.search(run.replace("useradd", "").replace("groupadd", "")), run
    for copy in final.arguments("COPY"):
        if copy.startswith("--from="):
            source_stage = copy.split()[0].removeprefix("--from=")
            assert source_stage in ("deps", "protos"), copy


def test_protos_are_generated_at_build_time(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    protos = next(s for s in stages if s.name == "protos")
    assert any("tools/protogen.py" in run for run in protos.arguments("RUN"))
    # media's native egress loop is compiled there too (the final stage has no compiler).
    assert any("services/media/native/build.py build/gen" in run for run in protos.arguments("RUN"))
    final = stages[-1]
    assert "--from=protos /src/build ./build" in final.arguments("COPY")
    # The gateway reads build/spaces.binpb beside services/, which is where WORKDIR puts it.
    assert final.arguments("WORKDIR") == ["/app"]
    env = " ".join(final.arguments("ENV"))
    assert "PYTHONPATH=/app:/app/build/gen" in env


def test_runs_as_a_numeric_non_root_user(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    users = stages[-1].arguments("USER")
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    # The chart's securityContext runs the same user.
    values = (ROOT / "deploy/helm/spaces/values.yaml").read_text()
    assert f"runAsUser: {uid}" in values


def test_the_command_picks_a_service_that_exists(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    commands = stages[-1].arguments("CMD")
    assert len(commands) == 1
    argv = ast.literal_eval(commands[0])
    assert argv[:2] == ["python", "-m"]
    assert (ROOT / (argv[2].replace(".", "/") + ".py")).exists()
    assert stages[-1].arguments("ENTRYPOINT") == [], "an entrypoint would swallow the command"


def test_every_copied_path_exists_and_is_in_the_context(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    patterns = dockerignore_patterns()
    copied = []
    for stage in stages:
        for copy in stage.arguments("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _destination = shlex.split(copy)
            copied.extend(sources)
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), f".dockerignore excludes {source}"
    # The chart's hook and test pods run these scripts from the image.
    assert "deploy/docker/migrate.py" in copied and "deploy/docker/healthcheck.py" in copied


def test_dockerignore_keeps_local_state_out(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "build/gen", "node_modules", ".env", "tests/system"):
        assert ignored(path, patterns), path
    for path in ("services/rooms/main.py", "protos/spaces", "tools/protogen.py"):
        assert not ignored(path, patterns), path


def test_exposed_ports_match_the_chart(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    exposed = " ".join(stages[-1].arguments("EXPOSE")).split()
    assert exposed == ["50051", "9100", "8080", "31000/udp"]


# -- what the deps stage installs covers what services import -------------------------------


def _runtime_distributions() -> set[str]:
    """pyproject's [project] dependencies and everything they require, as installed here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(spec) for spec in project["dependencies"]]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for spec in _requirements_of(requirement.name):
            nested = Requirement(spec)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if nested.marker is None or any(nested.marker.evaluate(e) for e in environments):
                pending.append(nested)
    return seen


def _requirements_of(distribution: str) -> list[str]:
    """What an installed distribution requires (nothing known when it is not installed:
    its own name still counts, and an import of it is then found missing anyway)."""
    try:
        return importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def _imported_top_level_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


def test_runtime_dependencies_cover_every_import_of_the_services() -> None:
    """The image installs [project] dependencies only (no dev extras): a service importing a
    dev-only package would start here and crash in the cluster."""
    runtime = _runtime_distributions()
    owners = importlib.metadata.packages_distributions()
    # _spaces_media_fanout is built into build/gen by the protos stage.
    first_party = {"services", "spaces", "buf", "__future__", "_spaces_media_fanout"}
    missing = []
    for module, path in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in first_party:
            continue
        distributions = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if not distributions & runtime:
            missing.append(f"{module} ({path.relative_to(ROOT)}; from {sorted(distributions)})")
    assert missing == [], "imported by services but not a runtime dependency: " + ", ".join(missing)

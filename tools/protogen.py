"""Generate Python code, type stubs and a descriptor set from ``protos/``.

``buf/validate/validate.proto`` normally comes from the Buf Schema Registry, which is not
reachable offline; the ``protovalidate`` wheel carries its serialized descriptor, so we lift
it from there and hand it to ``protoc`` through ``--descriptor_set_in``. The googleapis
protos (``google/api``, ``google/rpc``) are compiled from the sources that
``googleapis-common-protos`` ships; their Python modules are that package's own, so every
process shares one copy of each descriptor.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import google.api.annotations_pb2
import grpc_tools
import protovalidate
from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUILD = ROOT / "build"
GEN = BUILD / "gen"
TEST_PROTOS = ROOT / "tests" / "protos"
DESCRIPTOR_SET = BUILD / "spaces.binpb"


def validate_descriptor_bytes() -> bytes:
    """Return the serialized ``FileDescriptorProto`` of ``buf/validate/validate.proto``."""
    source = Path(protovalidate.__file__).parent / "_gen/buf/validate/validate_pb.py"
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "file_desc"
        ):
            value = ast.literal_eval(node.args[0])
            if isinstance(value, bytes):
                return value
    raise RuntimeError(f"no file_desc(...) call with a bytes literal in {source}")


def bootstrap_descriptor_set(path: Path) -> None:
    """Write a descriptor set holding validate.proto and the well-known files it imports."""
    fds = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        fds.file.add().MergeFromString(module.DESCRIPTOR.serialized_pb)
    fds.file.add().MergeFromString(validate_descriptor_bytes())
    path.write_bytes(fds.SerializeToString())


def include_args(protos: Path, bootstrap: Path) -> list[str]:
    """The protoc flags that resolve our imports: validate.proto, googleapis, well-known."""
    googleapis = Path(google.api.annotations_pb2.__file__).parent.parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    return [
        f"--descriptor_set_in={bootstrap}",
        f"--proto_path={protos}",
        f"--proto_path={googleapis}",
        f"--proto_path={well_known}",
    ]


def proto_files(protos: Path) -> list[str]:
    return sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))


def build_descriptor_set(protos: Path, out: Path) -> int:
    """Compile ``protos`` into a descriptor set only (used to compare against old commits)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    bootstrap = out.with_suffix(".bootstrap.binpb")
    bootstrap_descriptor_set(bootstrap)
    return int(
        protoc.main(
            [
                "grpc_tools.protoc",
                *include_args(protos, bootstrap),
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *proto_files(protos),
            ]
        )
    )


def main() -> int:
    if GEN.exists():
        shutil.rmtree(GEN)
    GEN.mkdir(parents=True)
    bootstrap = BUILD / "bootstrap.binpb"
    bootstrap_descriptor_set(bootstrap)

    sources = proto_files(PROTOS)
    if not sources:
        print("no .proto files under protos/", file=sys.stderr)
        return 1

    bindir = Path(sys.executable).parent
    plugins = [
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={GEN}",
        f"--mypy_out=quiet:{GEN}",
        f"--grpc_python_out={GEN}",
        f"--mypy_grpc_out=quiet:{GEN}",
    ]
    code: int = protoc.main(
        [
            "grpc_tools.protoc",
            *include_args(PROTOS, bootstrap),
            *plugins,
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={DESCRIPTOR_SET}",
            "buf/validate/validate.proto",
            *sources,
        ]
    )
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return code
    # Protos used only by tests are generated beside the product's, but stay out of the
    # published descriptor set and out of buf's checks.
    test_sources = proto_files(TEST_PROTOS) if TEST_PROTOS.exists() else []
    if test_sources:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={TEST_PROTOS}",
                *include_args(PROTOS, bootstrap),
                *plugins,
                *test_sources,
            ]
        )
        if code != 0:
            print("protoc failed on tests/protos", file=sys.stderr)
            return code
    # Every generated folder becomes a regular package so mypy and importers agree.
    for folder in (p for p in GEN.rglob("*") if p.is_dir()):
        (folder / "__init__.py").touch()
    (GEN / "py.typed").touch()
    print(f"generated {len(sources)} proto files into {GEN.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

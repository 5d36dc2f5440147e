"""The API contract rules of protos/STYLE.md that buf lint does not check.

Reads build/spaces.binpb (written by tools/protogen.py with imports and source info) and
checks every file under spaces/. Each test collects every offender across the tree and
lists them all in its failure message, one per line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from buf.validate import validate_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2

from tools import protodesc

FDP = descriptor_pb2.FileDescriptorProto
DP = descriptor_pb2.DescriptorProto
FieldType = descriptor_pb2.FieldDescriptorProto
Path_ = protodesc.Path_

# A request field without a validation rule must say so in its comment with this phrase.
ANY_VALUE = "Any value is accepted"
# One error of an RPC comment: `CODE (REASON): explanation`.
ERROR_LINE = re.compile(r"^(?P<code>[A-Z_]+) \((?P<reason>[A-Z][A-Z0-9_]*)\): \S")
STATUS_CODES = frozenset(name for name in code_pb2.Code.keys() if name != "OK")
PATH_VARIABLE = re.compile(r"\{(?P<field>[^}=]+)(?:=[^}]*)?\}")


@pytest.fixture(scope="module")
def fds() -> descriptor_pb2.FileDescriptorSet:
    try:
        return protodesc.load_descriptor_set()
    except FileNotFoundError as missing:
        pytest.fail(str(missing))


@pytest.fixture(scope="module")
def messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, DP]:
    return protodesc.messages_by_name(fds)


def report(offenders: list[str], what: str) -> None:
    """Fail listing every offender, or pass when there are none."""
    if offenders:
        listing = "\n".join(f"  {line}" for line in offenders)
        pytest.fail(f"{len(offenders)} {what}:\n{listing}", pytrace=False)


def rpcs(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[FDP, str, descriptor_pb2.MethodDescriptorProto, str]]:
    """(file, full RPC name, method, leading comment) for every RPC of our files."""
    for file in protodesc.own_files(fds):
        for i, service in enumerate(file.service):
            for j, method in enumerate(service.method):
                name = f"{file.package}.{service.name}.{method.name}"
                yield file, name, method, protodesc.method_comment(file, i, j)


def test_every_element_has_a_leading_comment(fds: descriptor_pb2.FileDescriptorSet) -> None:
    offenders = []
    for file in protodesc.own_files(fds):
        comments = protodesc.leading_comments(file)
        for element in protodesc.elements(file):
            if not comments.get(element.path, "").strip():
                offenders.append(f"{file.name}: {element.kind} {element.name}")
    report(offenders, "elements without a leading comment")


def test_every_rpc_has_an_access_option(fds: descriptor_pb2.FileDescriptorSet) -> None:
    offenders = []
    for file, name, method, _ in rpcs(fds):
        access = protodesc.access_name(method)
        if access is None:
            offenders.append(f"{file.name}: {name} has no (spaces.common.v1.access)")
        elif access == "ACCESS_UNSPECIFIED":
            offenders.append(f"{file.name}: {name} sets access to ACCESS_UNSPECIFIED")
    report(offenders, "RPCs without a usable access option")


def test_http_rules_follow_access(fds: descriptor_pb2.FileDescriptorSet) -> None:
    offenders = []
    for file, name, method, _ in rpcs(fds):
        access = protodesc.access_name(method)
        rule = protodesc.http_rule(method)
        if access == "ACCESS_INTERNAL":
            if rule is not None:
                offenders.append(f"{file.name}: {name} is ACCESS_INTERNAL but has an http rule")
            continue
        if rule is None:
            offenders.append(f"{file.name}: {name} is {access} but has no google.api.http rule")
            continue
        bindings = protodesc.http_bindings(rule)
        if not bindings:
            offenders.append(f"{file.name}: {name} has an http rule without a method and path")
        for verb, path in bindings:
            if not path.startswith("/v1/"):
                offenders.append(f"{file.name}: {name} route {verb} {path} is not under /v1/")
        if rule.body and bindings and bindings[0][0] in ("GET", "DELETE"):
            offenders.append(f"{file.name}: {name} has a body on a GET or DELETE rule")
    report(offenders, "RPCs whose http rule does not match their access")


def errors_problem(comment: str) -> str | None:
    """What is wrong with the errors section of an RPC comment, or None."""
    lines = [line[1:] if line.startswith(" ") else line for line in comment.rstrip().split("\n")]
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("Errors:")]
    if not starts:
        return 'its comment has no "Errors:" section'
    head = lines[starts[-1]].strip()
    rest = [line for line in lines[starts[-1] + 1 :] if line.strip()]
    if head != "Errors:":  # the inline form: "Errors: none beyond authentication."
        return f"text follows the inline {head!r}" if rest else None
    if not rest:
        return '"Errors:" lists no errors'
    indent = len(rest[0]) - len(rest[0].lstrip())
    for line in rest:
        depth = len(line) - len(line.lstrip())
        match = ERROR_LINE.match(line.strip())
        if depth == indent and match and match["code"] in STATUS_CODES:
            continue
        if depth > indent:  # continuation of the previous error's explanation
            continue
        return f"error line {line.strip()!r} is not `CODE (REASON): text` with a gRPC code"
    return None


def test_rpc_comments_list_their_errors(
    fds: descriptor_pb2.FileDescriptorSet, messages: dict[str, DP]
) -> None:
    """Every RPC comment ends with its errors (STYLE.md), unless it takes no input at all.

    An RPC that cannot fail beyond authentication says so inline, for example
    "Errors: none beyond authentication."; one whose request has no fields may omit it.
    """
    offenders = []
    for file, name, method, comment in rpcs(fds):
        problem = errors_problem(comment)
        request = messages.get(method.input_type)
        if problem == 'its comment has no "Errors:" section' and request and not request.field:
            continue
        if problem:
            offenders.append(f"{file.name}: {name}: {problem}")
    report(offenders, "RPC comments without a well-formed errors section")


def has_rule(field: descriptor_pb2.FieldDescriptorProto) -> bool:
    if not field.options.HasExtension(validate_pb2.field):
        return False
    return bool(field.options.Extensions[validate_pb2.field].ListFields())


def request_messages(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[FDP, str, DP, Path_]]:
    """Request messages (named *Request or used as RPC input) and the messages nested in them."""
    inputs = {method.input_type for _, _, method, _ in rpcs(fds)}

    def nested(
        prefix: str, message: DP, path: tuple[int, ...]
    ) -> Iterator[tuple[str, DP, tuple[int, ...]]]:
        if message.options.map_entry:
            return
        full = f"{prefix}.{message.name}"
        yield full, message, path
        for i, inner in enumerate(message.nested_type):
            yield from nested(full, inner, (*path, DP.NESTED_TYPE_FIELD_NUMBER, i))

    for file in protodesc.own_files(fds):
        for i, message in enumerate(file.message_type):
            full = f".{file.package}.{message.name}"
            if message.name.endswith("Request") or full in inputs:
                path = (FDP.MESSAGE_TYPE_FIELD_NUMBER, i)
                for name, inner, inner_path in nested(f".{file.package}", message, path):
                    yield file, name.lstrip("."), inner, inner_path


def test_request_fields_have_validation_rules(fds: descriptor_pb2.FileDescriptorSet) -> None:
    offenders = []
    for file, name, message, path in request_messages(fds):
        comments = protodesc.leading_comments(file)
        for i, field in enumerate(message.field):
            if has_rule(field):
                continue
            comment = comments.get((*path, DP.FIELD_FIELD_NUMBER, i), "")
            if ANY_VALUE in " ".join(comment.split()):  # the phrase may wrap across lines
                continue
            offenders.append(
                f"{file.name}: {name}.{field.name} has no (buf.validate.field) rule "
                f'and its comment does not say "{ANY_VALUE}"'
            )
    report(offenders, "request fields without validation")


def resolve(messages: dict[str, DP], message: DP, dotted: str) -> str | None:
    """Why a dotted field path does not name a singular scalar field of message, or None."""
    parts = dotted.split(".")
    current = message
    for depth, part in enumerate(parts):
        field = next((f for f in current.field if f.name == part), None)
        if field is None:
            return f"{current.name} has no field {part!r}"
        if field.label == FieldType.LABEL_REPEATED:
            return f"{current.name}.{part} is repeated"
        last = depth == len(parts) - 1
        if field.type == FieldType.TYPE_MESSAGE:
            if last:
                return f"{current.name}.{part} is a message, not a scalar"
            current = messages[field.type_name]
        elif not last:
            return f"{current.name}.{part} is not a message, so {dotted!r} goes nowhere"
    return None


def test_http_paths_bind_request_fields(
    fds: descriptor_pb2.FileDescriptorSet, messages: dict[str, DP]
) -> None:
    offenders = []
    for file, name, method, _ in rpcs(fds):
        rule = protodesc.http_rule(method)
        request = messages.get(method.input_type)
        if rule is None or request is None:
            continue
        for verb, path in protodesc.http_bindings(rule):
            for variable in PATH_VARIABLE.finditer(path):
                problem = resolve(messages, request, variable["field"].strip())
                if problem:
                    offenders.append(f"{file.name}: {name} {verb} {path}: {problem}")
        for body in (rule.body, *(b.body for b in rule.additional_bindings)):
            if body and body != "*" and not any(f.name == body for f in request.field):
                offenders.append(f"{file.name}: {name}: body {body!r} is not a request field")
    report(offenders, "http rules binding missing fields")


def has_field(message: DP | None, name: str, kind: int) -> bool:
    return message is not None and any(
        f.name == name and f.type == kind and f.label != FieldType.LABEL_REPEATED
        for f in message.field
    )


def test_list_methods_paginate(
    fds: descriptor_pb2.FileDescriptorSet, messages: dict[str, DP]
) -> None:
    offenders = []
    for file, name, method, _ in rpcs(fds):
        if not re.match(r"List[A-Z]", method.name):
            continue
        request = messages.get(method.input_type)
        response = messages.get(method.output_type)
        if not has_field(request, "page_size", FieldType.TYPE_INT32):
            offenders.append(f"{file.name}: {name} request has no int32 page_size")
        if not has_field(request, "page_token", FieldType.TYPE_STRING):
            offenders.append(f"{file.name}: {name} request has no string page_token")
        if not has_field(response, "next_page_token", FieldType.TYPE_STRING):
            offenders.append(f"{file.name}: {name} response has no string next_page_token")
    report(offenders, "List methods without pagination")


@pytest.mark.parametrize(
    ("comment", "problem"),
    [
        (" Does X.\n\n Errors:\n   NOT_FOUND (SPACE_NOT_FOUND): no such Space.\n", None),
        (" Does X.\n Errors:\n   NOT_FOUND (X): a\n     longer explanation.\n", None),
        (" Does X.\n\n Errors: none beyond authentication.\n", None),
        (" Does X.\n", 'its comment has no "Errors:" section'),
        (" Does X.\n Errors:\n", '"Errors:" lists no errors'),
        (" Errors:\n   NOT_FOUND: no reason.\n", "is not `CODE (REASON): text`"),
        (" Errors:\n   MISSING (X): not a code.\n", "is not `CODE (REASON): text`"),
    ],
)
def test_errors_section_parser(comment: str, problem: str | None) -> None:
    found = errors_problem(comment)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found

"""Check that services answer their health checks: the chart's ``helm test`` pod.

Usage: ``python deploy/docker/healthcheck.py [--timeout S] TARGET...`` where a target is
``grpc://host:port/fully.qualified.Service`` (standard gRPC health, SERVING) or
``http://host:port/path`` (status 200). Every target is retried until the timeout; the exit
code is 0 only when all of them answered healthy, and each result is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ATTEMPT_TIMEOUT_S = 3.0
RETRY_PAUSE_S = 1.0


def check_grpc(target: str) -> str | None:
    """Return ``None`` when the gRPC service is SERVING, else what went wrong."""
    parts = urlsplit(target)
    service = parts.path.lstrip("/")
    with grpc.insecure_channel(parts.netloc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=ATTEMPT_TIMEOUT_S
            )
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return None


def check_http(target: str) -> str | None:
    """Return ``None`` when the URL answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(target, timeout=ATTEMPT_TIMEOUT_S) as reply:
            status = int(reply.status)
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return str(error)
    return None if status == 200 else f"HTTP {status}"


def check(target: str) -> str | None:
    """Check one target by its scheme."""
    scheme = urlsplit(target).scheme
    if scheme == "grpc":
        return check_grpc(target)
    if scheme in ("http", "https"):
        return check_http(target)
    return f"unknown scheme {scheme!r} (grpc, http or https)"


def wait_healthy(target: str, timeout_s: float) -> str | None:
    """Retry ``target`` until it is healthy or ``timeout_s`` passes; return the last error."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = check(target)
        if problem is None or time.monotonic() + RETRY_PAUSE_S > deadline:
            return problem
        time.sleep(RETRY_PAUSE_S)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per target")
    parser.add_argument("targets", nargs="+", help="grpc://host:port/Service or http(s)://...")
    args = parser.parse_args(argv)
    failed = 0
    for target in args.targets:
        problem = wait_healthy(target, args.timeout)
        print(f"ok {target}" if problem is None else f"FAIL {target}: {problem}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

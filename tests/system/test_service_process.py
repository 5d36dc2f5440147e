"""A service as a real process: serving, then NOT_SERVING on SIGTERM, then a clean exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.tokens import SigningKey, jwks

ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_turns_health_not_serving_then_exits_cleanly(
    signing_key: SigningKey,
) -> None:
    env = {
        **os.environ,
        "TESTING_JWKS": json.dumps(jwks(signing_key)),
        "SPACES_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.testing_server",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        if not line.startswith(b"PORT "):
            assert process.stderr is not None
            pytest.fail(f"the server did not start: {(await process.stderr.read()).decode()}")
        port = int(line.split()[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(watch.read(), timeout=5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            process.send_signal(signal.SIGTERM)
            update = await asyncio.wait_for(watch.read(), timeout=5)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert process.stderr is not None
        output = (await process.stderr.read()).splitlines()
        # gRPC C-core may write its own plain-text lines to stderr; ours are JSON.
        logs = [json.loads(line) for line in output if line.startswith(b"{")]
        messages = [entry["message"] for entry in logs]
        assert "testing received a stop signal" in messages
        assert "testing stopped" in messages
        assert all(entry["service"] == "testing" for entry in logs)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

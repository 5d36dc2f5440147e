"""Runs the test service as a real process: ``python -m tests.helpers.testing_server``.

Reads the JWKS from ``TESTING_JWKS`` (JSON) and the shared settings from the environment,
serves on a free port and prints ``PORT <n>`` on stdout once it is serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from spaces.testing.v1 import testing_service_pb2 as pb
from spaces.testing.v1 import testing_service_pb2_grpc as pb_grpc

from services.common.auth import StaticJwksSource
from services.common.server import Service, run_service
from services.common.settings import CommonSettings
from tests.helpers.servers import testing_settings
from tests.helpers.testing_servicer import TestingServicer


async def main() -> None:
    service = Service(
        "testing",
        testing_settings(),
        CommonSettings(),
        jwks=StaticJwksSource(json.loads(os.environ["TESTING_JWKS"])),
    )
    service.add_servicer(
        pb.DESCRIPTOR.services_by_name["TestingService"],
        TestingServicer(),
        pb_grpc.add_TestingServiceServicer_to_server,
    )

    async def announce() -> None:
        print(f"PORT {service.port}", flush=True)

    service.on_startup(announce)
    await run_service(service)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

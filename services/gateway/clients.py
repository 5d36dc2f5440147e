"""Who is calling: the key a client's rate-limit bucket and logs go by.

A request with a valid access token is its user's (``user:<id>``), wherever it comes from;
anything else is its IP address's (``ip:<addr>``). The token is verified with identity's
public keys (:class:`services.common.jwks_client.IdentityJwksSource`): an unverified subject
would let a client spread its requests over made-up users.
"""

from __future__ import annotations

import logging

from services.common.auth import TokenVerifier
from services.common.errors import ServiceError

logger = logging.getLogger(__name__)

__all__ = ["ClientIdentifier"]

_GET_JWKS = "spaces.identity.v1.IdentityService.GetJwks"


class ClientIdentifier:
    """Names the client of a request.

    :param verifier: checks access tokens; ``None`` keys every request by IP.
    """

    def __init__(self, verifier: TokenVerifier | None) -> None:
        self._verifier = verifier

    async def key(self, token: str | None, ip: str) -> str:
        """``user:<id>`` for a valid user token, ``service:<name>`` for a service's, else IP."""
        if token and self._verifier is not None:
            try:
                principal = await self._verifier.verify(token)
            except ServiceError:
                # Bad, expired, or keys unavailable: the backend will answer 401 itself;
                # until then the request counts against its address.
                return f"ip:{ip}"
            except Exception:  # a JWKS fetch failing in an unexpected way
                logger.warning("token check for rate limiting failed", exc_info=True)
                return f"ip:{ip}"
            if principal.user_id:
                return f"user:{principal.user_id}"
            return f"service:{principal.service_name or 'unknown'}"
        return f"ip:{ip}"

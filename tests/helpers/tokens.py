"""Signing keys and tokens for tests, standing in for identity's key management."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from services.common.auth import ACCESS_TOKEN_AUDIENCE, ACCESS_TOKEN_ISSUER

TEST_INTERNAL_SECRET = "test-internal-secret-0123456789abcdef0123456789"


@dataclass(frozen=True)
class SigningKey:
    """A private key as identity would hold it, with its public JWK."""

    kid: str
    alg: str
    private_key: Any

    @classmethod
    def ed25519(cls, kid: str = "test-ed25519") -> SigningKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def es256(cls, kid: str = "test-es256") -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def public_jwk(self) -> dict[str, Any]:
        algorithm = OKPAlgorithm if self.alg == "EdDSA" else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def mint(
        self,
        sub: str = "alice",
        *,
        ttl_s: float = 300,
        aud: str = ACCESS_TOKEN_AUDIENCE,
        iss: str = ACCESS_TOKEN_ISSUER,
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        """Return an access token for ``sub`` signed with this key."""
        now = int(time.time())
        payload = {
            "iss": iss,
            "aud": aud,
            "sub": sub,
            "iat": now,
            "exp": now + int(ttl_s),
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(
            payload, self.private_key, algorithm=self.alg, headers={"kid": kid or self.kid}
        )


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """Return the JWKS document publishing ``keys``."""
    return {"keys": [key.public_jwk() for key in keys]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(sub: str = "alice", kid: str = "test-ed25519") -> str:
    """Return an ``alg: none`` token with otherwise valid claims."""
    now = int(time.time())
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    claims = {
        "iss": ACCESS_TOKEN_ISSUER,
        "aud": ACCESS_TOKEN_AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def hs256_with_public_key(key: SigningKey, sub: str = "alice") -> str:
    """Return the algorithm-confusion attack: HS256 keyed with the public key's JWK text.

    Built by hand, since PyJWT refuses to use an asymmetric key as an HMAC secret.
    """
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    claims = {
        "iss": ACCESS_TOKEN_ISSUER,
        "aud": ACCESS_TOKEN_AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 300,
        "jti": "x",
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    secret = json.dumps(key.public_jwk()).encode()
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"

"""Token signing keys: Ed25519, named by ``kid``, rotated without logging anyone out.

Each key has an *activation time*. The signer at any moment is the key activated most
recently; there is no "retired" flag to keep in step between replicas, since every replica
derives the same signer from the same rows and the clock. A key's life:

1. **Next**: created with an activation time ``key_prepublish_lead`` in the future. It is in
   the JWKS already, so every service has it cached before the first token it signs.
2. **Current**: signs from its activation until the next key's.
3. **Previous**: stopped signing, but stays in the JWKS until every token it signed has
   expired (its successor's activation + the access-token lifetime + clock leeway).
4. **Gone**: no token it signed can still be valid; its row may be deleted.

Private keys are stored as PKCS#8 PEM, encrypted when a key-encryption secret is set.
This module is pure (no I/O); :mod:`services.identity.signing` loads and rotates keys.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

logger = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "KeyRing", "KeySchedule", "SigningKey", "plan_rotation"]

ALGORITHM = "EdDSA"

# Verifiers accept tokens up to this much past ``exp`` (TokenVerifier's default leeway is
# 30 s); a retired key stays published that much longer.
VERIFY_LEEWAY = dt.timedelta(minutes=1)


@dataclasses.dataclass(frozen=True)
class KeySchedule:
    """When a key was made and when it starts signing (no key material)."""

    kid: str
    created_at: dt.datetime
    activate_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """One signing key pair.

    :param kid: the key id in the JWT header and the JWKS.
    :param private_key: the Ed25519 private key.
    :param created_at: when the key was made.
    :param activate_at: when it starts signing.
    """

    kid: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False)
    created_at: dt.datetime
    activate_at: dt.datetime

    @classmethod
    def generate(cls, now: dt.datetime, activate_at: dt.datetime | None = None) -> SigningKey:
        """Make a new key, signing from ``activate_at`` (default: ``now``)."""
        kid = now.strftime("%Y%m%d") + "-" + secrets.token_hex(6)
        return cls(
            kid=kid,
            private_key=Ed25519PrivateKey.generate(),
            created_at=now,
            activate_at=activate_at or now,
        )

    @property
    def schedule(self) -> KeySchedule:
        """The key's times, without the key."""
        return KeySchedule(self.kid, self.created_at, self.activate_at)

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK (RFC 8037 OKP key)."""
        jwk = OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {
            "kty": str(jwk["kty"]),
            "crv": str(jwk["crv"]),
            "x": str(jwk["x"]),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    def private_pem(self, encryption_secret: bytes | None) -> bytes:
        """PKCS#8 PEM of the private key, encrypted when a secret is given."""
        algorithm: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(encryption_secret)
            if encryption_secret
            else serialization.NoEncryption()
        )
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, algorithm
        )

    @classmethod
    def from_pem(
        cls,
        kid: str,
        pem: bytes,
        encryption_secret: bytes | None,
        created_at: dt.datetime,
        activate_at: dt.datetime,
    ) -> SigningKey:
        """Load a key stored by :meth:`private_pem`.

        :raises ValueError: wrong secret, or not an Ed25519 key.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=encryption_secret or None)
        except TypeError as error:
            # cryptography says TypeError for "encrypted but no password" and vice versa.
            raise ValueError(f"signing key {kid}: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"signing key {kid} is not an Ed25519 key")
        return cls(kid=kid, private_key=key, created_at=created_at, activate_at=activate_at)


def _successor_activation(schedules: Sequence[KeySchedule], key: KeySchedule) -> dt.datetime | None:
    later = [s.activate_at for s in schedules if _order(s) > _order(key)]
    return min(later) if later else None


def _order(schedule: KeySchedule) -> tuple[dt.datetime, str]:
    # Activation time first; the kid breaks ties so every replica picks the same signer.
    return (schedule.activate_at, schedule.kid)


def current_schedule(schedules: Sequence[KeySchedule], now: dt.datetime) -> KeySchedule | None:
    """The key that signs at ``now``: the one activated most recently, if any."""
    active = [s for s in schedules if s.activate_at <= now]
    return max(active, key=_order) if active else None


def still_needed(
    schedules: Sequence[KeySchedule], key: KeySchedule, now: dt.datetime, token_ttl: dt.timedelta
) -> bool:
    """Whether a token signed by ``key`` may still be valid at ``now`` (or it signs later)."""
    successor = _successor_activation(schedules, key)
    if successor is None or successor > now:
        return True  # current or next
    return successor + token_ttl + VERIFY_LEEWAY > now


def plan_rotation(
    schedules: Sequence[KeySchedule],
    now: dt.datetime,
    *,
    interval: dt.timedelta,
    lead: dt.timedelta,
) -> dt.datetime | None:
    """Decide whether a new key is due; return its activation time, or ``None``.

    * No key that signs now: bootstrap, a key active at once (no token exists to verify).
    * A next key already waits: nothing to do.
    * The current key signs until ``activate_at + interval``: the next key is made
      ``lead`` before that, so it is published for ``lead`` before it signs.
    """
    current = current_schedule(schedules, now)
    if current is None:
        pending = [s for s in schedules if s.activate_at > now]
        return None if pending else now
    if any(_order(s) > _order(current) for s in schedules):
        return None
    due = current.activate_at + interval
    if now < due - lead:
        return None
    return max(due, now + lead)


class KeyRing:
    """The keys one replica holds: the signer plus those still needed for verifying.

    :param keys: every stored key.
    :param token_ttl: the lifetime of the access tokens these keys sign.
    :raises ValueError: when ``keys`` is empty.
    """

    def __init__(self, keys: Sequence[SigningKey], token_ttl: dt.timedelta) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self.token_ttl = token_ttl
        self._keys = {k.kid: k for k in keys}
        self._schedules = [k.schedule for k in keys]

    def signer(self, now: dt.datetime) -> SigningKey:
        """The key that signs at ``now``.

        Before the first key's activation (only possible with a clock skewed backwards) the
        earliest key signs, rather than nothing.
        """
        current = current_schedule(self._schedules, now)
        if current is None:
            current = min(self._schedules, key=_order)
        return self._keys[current.kid]

    def published(self, now: dt.datetime) -> list[SigningKey]:
        """The keys of the JWKS at ``now``: the signer first, then next and previous keys."""
        signer = self.signer(now)
        rest = [
            self._keys[s.kid]
            for s in sorted(self._schedules, key=_order, reverse=True)
            if s.kid != signer.kid and still_needed(self._schedules, s, now, self.token_ttl)
        ]
        return [signer, *rest]

    def jwks(self, now: dt.datetime) -> list[dict[str, str]]:
        """The published keys as JWKs, signer first."""
        return [k.public_jwk() for k in self.published(now)]

    def get(self, kid: str) -> SigningKey | None:
        """The key named ``kid``, if this ring holds it."""
        return self._keys.get(kid)

    @property
    def kids(self) -> list[str]:
        """Every key id held, oldest activation first."""
        return [s.kid for s in sorted(self._schedules, key=_order)]

    def expired(self, now: dt.datetime) -> list[str]:
        """Kids of keys no valid token can carry any more (safe to delete)."""
        return [
            s.kid
            for s in self._schedules
            if not still_needed(self._schedules, s, now, self.token_ttl)
        ]

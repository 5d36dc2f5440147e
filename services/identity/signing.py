"""The signing keys one identity replica holds, kept in step with the database.

:class:`KeyManager` loads the keys at start-up (creating the first one if there is none),
then every ``key_check_interval_s`` rotates them when due and reloads them, so every
replica knows a new key long before it starts signing (see :mod:`services.identity.keys`).
It is also identity's own :class:`~services.common.auth.JwksSource`: identity verifies the
tokens it issued with its key ring, without calling itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable

import jwt
from pydantic import SecretStr

from services.common.errors import Unavailable
from services.identity.keys import KeyRing, KeySchedule, SigningKey, plan_rotation
from services.identity.store import IdentityStore

logger = logging.getLogger(__name__)

__all__ = ["Clock", "KeyManager", "utc_now"]

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """The current time, timezone-aware in UTC."""
    return dt.datetime.now(dt.UTC)


class KeyManager:
    """Holds the key ring, rotates it when due and reloads it periodically.

    :param token_ttl: lifetime of the access tokens the keys sign.
    :param rotation_interval: how long each key signs.
    :param prepublish_lead: how long a key is published before it signs.
    :param check_interval_s: seconds between rotation checks and reloads.
    :param encryption_secret: passphrase of the stored private keys.
    :param clock: the time source.
    """

    def __init__(
        self,
        *,
        token_ttl: dt.timedelta,
        rotation_interval: dt.timedelta,
        prepublish_lead: dt.timedelta,
        check_interval_s: float,
        encryption_secret: SecretStr | None,
        clock: Clock = utc_now,
    ) -> None:
        self._token_ttl = token_ttl
        self._interval = rotation_interval
        self._lead = prepublish_lead
        self._check_interval_s = check_interval_s
        secret = encryption_secret.get_secret_value() if encryption_secret else ""
        self._secret: bytes | None = secret.encode() if secret else None
        self._clock = clock
        self._store: IdentityStore | None = None
        self._ring: KeyRing | None = None
        self._verification_keys: dict[str, jwt.PyJWK] = {}
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, store: IdentityStore) -> None:
        """Load the keys (making the first if needed) and start the periodic check."""
        self._store = store
        await self.check()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="identity signing keys")

    async def stop(self) -> None:
        """Stop the periodic check."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep signing with the keys held: they stay valid far longer than a
                # database outage is likely to last.
                logger.exception("checking the signing keys failed; keeping the loaded ones")

    async def check(self) -> None:
        """Rotate when due, reload, and delete keys no token can carry any more."""
        store = self._require_store()
        now = self._clock()

        def plan(schedules: list[KeySchedule]) -> SigningKey | None:
            activate_at = plan_rotation(schedules, now, interval=self._interval, lead=self._lead)
            return SigningKey.generate(now, activate_at) if activate_at is not None else None

        added = await store.add_signing_key(plan, self._secret)
        if added is not None:
            logger.info(
                "added signing key %s, signing from %s", added.kid, added.activate_at.isoformat()
            )
        await self.reload()
        ring = self._require_ring()
        expired = ring.expired(now)
        if expired and await store.delete_signing_keys(expired):
            logger.info("deleted expired signing keys %s", expired)
            await self.reload()

    async def rotate_now(self, activate_in: dt.timedelta = dt.timedelta(0)) -> SigningKey:
        """Add a key signing ``activate_in`` from now whatever the schedule (operators, tests).

        With no lead, services that cached the JWKS meet an unknown ``kid`` and refetch
        (rate-limited), so planned rotations should leave :meth:`check` to do it.
        """
        store = self._require_store()
        now = self._clock()
        key = await store.add_signing_key(
            lambda _: SigningKey.generate(now, now + activate_in), self._secret
        )
        assert key is not None
        logger.info("rotated signing key on demand: %s signs from %s", key.kid, key.activate_at)
        await self.reload()
        return key

    async def reload(self) -> None:
        """Replace the ring with the keys now in the database."""
        keys = await self._require_store().load_signing_keys(self._secret)
        if not keys:
            raise RuntimeError("no signing keys in the database")
        previous = self._ring.signer(self._clock()).kid if self._ring else None
        ring = KeyRing(keys, self._token_ttl)
        self._verification_keys = {
            jwk["kid"]: jwt.PyJWK.from_dict(jwk) for jwk in ring.jwks(self._clock())
        }
        self._ring = ring
        current = ring.signer(self._clock()).kid
        if current != previous:
            logger.info("signing with key %s", current)

    # -- use ---------------------------------------------------------------------------

    def signer(self) -> SigningKey:
        """The key to sign with now."""
        return self._require_ring().signer(self._clock())

    def jwks(self) -> list[dict[str, str]]:
        """The published public keys, the signer first."""
        return self._require_ring().jwks(self._clock())

    async def get_keys(self) -> dict[str, jwt.PyJWK]:
        """:class:`~services.common.auth.JwksSource`: the published keys by ``kid``."""
        return dict(self._verification_keys)

    def _require_store(self) -> IdentityStore:
        if self._store is None:
            raise Unavailable("signing keys are not loaded yet", reason="STARTING")
        return self._store

    def _require_ring(self) -> KeyRing:
        if self._ring is None:
            raise Unavailable("signing keys are not loaded yet", reason="STARTING")
        return self._ring

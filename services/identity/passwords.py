"""Password hashing with Argon2id (argon2-cffi).

Hashing is CPU-bound (tens of milliseconds by design), so callers run it in a thread to
keep the event loop responsive. :meth:`PasswordHasher.verify_unknown` burns the same work
for a handle that does not exist, so "unknown handle" and "wrong password" take similar time
and cannot be told apart.
"""

from __future__ import annotations

import asyncio
import logging

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

logger = logging.getLogger(__name__)


class PasswordHasher:
    """Argon2id hashing with parameters chosen for an interactive login.

    :param time_cost: Argon2 iterations.
    :param memory_cost_kib: memory per hash in KiB.
    :param parallelism: lanes per hash.
    """

    def __init__(
        self, *, time_cost: int = 2, memory_cost_kib: int = 19 * 1024, parallelism: int = 1
    ) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost_kib,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        # A real hash of a random password: verifying against it costs what a real check
        # costs, and it can never match.
        self._decoy = self._hasher.hash("decoy-password-that-nobody-has")

    async def hash(self, password: str) -> str:
        """Return the encoded Argon2id hash of ``password``."""
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, encoded: str, password: str) -> bool:
        """Return whether ``password`` matches ``encoded``."""
        return await asyncio.to_thread(self._verify_sync, encoded, password)

    async def verify_unknown(self, password: str) -> bool:
        """Spend the time of a real verification for a handle that does not exist."""
        await asyncio.to_thread(self._verify_sync, self._decoy, password)
        return False

    def needs_rehash(self, encoded: str) -> bool:
        """Whether ``encoded`` was made with weaker parameters than the current ones."""
        return self._hasher.check_needs_rehash(encoded)

    def _verify_sync(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            logger.warning("stored password hash could not be verified")
            return False

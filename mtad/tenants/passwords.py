"""Password hashing for tenant credentials: argon2id, salted, with OWASP's minimum parameters.

Only the encoded hash (which carries salt and parameters) is stored. `needs_rehash` lets a login upgrade a
hash made with older parameters.
"""

from __future__ import annotations

import argon2

# OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1. About 20 ms per verify on one core.
_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when the login is unknown, so an unknown login costs the same time as a wrong password.
_DECOY_HASH = _HASHER.hash("mtad decoy password")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash or _DECOY_HASH, password) and password_hash is not None
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False

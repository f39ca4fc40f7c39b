"""Tenant logins: the database says who exists now, argon2 says whether the password is right.

The tenant row is read on every login, so a disabled tenant or a changed password takes effect at once.
argon2 costs ~20 ms of CPU, so it runs in a worker thread (never on the event loop), and a successful
verification is remembered as a keyed BLAKE2 digest of the password next to the hash it was verified
against: a client that reconnects for every message pays argon2 once, not every time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict

from mtad.model import Tenant
from mtad.tenants.passwords import verify_password
from mtad.tenants.store import TenantStore

_CACHE_SIZE = 10_000


class CredentialVerifier:
    def __init__(self, tenants: TenantStore) -> None:
        self._tenants = tenants
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    async def verify(self, login: str, password: str) -> Tenant | None:
        credentials = await self._tenants.credentials(login)
        if credentials is None or credentials.disabled:
            await asyncio.to_thread(verify_password, None, password)  # same cost as a wrong password
            return None
        digest = hashlib.blake2b(password.encode("utf-8", "surrogateescape"), key=self._key).digest()
        cached = self._verified.get(login)
        if cached and cached[0] == credentials.password_hash and hmac.compare_digest(cached[1], digest):
            self._verified.move_to_end(login)
            return credentials.tenant
        if not await asyncio.to_thread(verify_password, credentials.password_hash, password):
            return None
        self._verified[login] = (credentials.password_hash, digest)
        while len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return credentials.tenant

    async def tenant(self, name: str) -> Tenant | None:
        """A tenant by name without a password (trusted networks)."""
        credentials = await self._tenants.credentials(name)
        return None if credentials is None or credentials.disabled else credentials.tenant

    def forget(self) -> None:
        self._verified.clear()

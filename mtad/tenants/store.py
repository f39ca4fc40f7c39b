"""Tenants in PostgreSQL: create, look up for AUTH, manage sending domains."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from mtad.db.queries import queries
from mtad.model import MessageClass, Tenant


class TenantError(ValueError):
    """An operator asked for something that cannot be (unknown tenant, domain owned by another tenant)."""


@dataclass(frozen=True)
class TenantCredentials:
    tenant: Tenant
    password_hash: str
    disabled: bool


class TenantStore:
    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        self._pool = pool
        self._sql = queries()

    async def credentials(self, name: str) -> TenantCredentials | None:
        row = await self._pool.fetchrow(self._sql["tenant_by_name"], name)
        if row is None:
            return None
        tenant = Tenant(
            id=row["id"],
            name=row["name"],
            domains=frozenset(row["domains"]),
            default_class=MessageClass(row["default_class"]),
        )
        return TenantCredentials(tenant=tenant, password_hash=row["password_hash"], disabled=row["disabled"])

    async def insert_tenant(self, name: str, password_hash: str) -> int:
        try:
            return await self._pool.fetchval(self._sql["insert_tenant"], name, password_hash)
        except asyncpg.UniqueViolationError:
            raise TenantError(f"tenant {name} exists already") from None
        except asyncpg.CheckViolationError:
            raise TenantError(f"tenant name {name!r} is not allowed: use a-z, 0-9, '.', '_', '-'") from None

    async def set_tenant_password(self, name: str, password_hash: str) -> None:
        if await self._pool.fetchval(self._sql["set_tenant_password"], name, password_hash) is None:
            raise TenantError(f"no tenant named {name}")

    async def set_default_class(self, name: str, message_class: MessageClass) -> None:
        if await self._pool.fetchval(self._sql["set_tenant_default_class"], name, message_class.value) is None:
            raise TenantError(f"no tenant named {name}")

    async def list_tenants(self) -> list[asyncpg.Record]:
        return await self._pool.fetch(self._sql["list_tenants"])

    async def add_tenant_domain(self, name: str, domain: str) -> None:
        try:
            found = await self._pool.fetchval(self._sql["add_tenant_domain"], name, domain)
        except asyncpg.UniqueViolationError:
            raise TenantError(f"domain {domain} already belongs to a tenant") from None
        if found is None:
            raise TenantError(f"no tenant named {name}")

    async def remove_tenant_domain(self, name: str, domain: str) -> None:
        if await self._pool.fetchval(self._sql["remove_tenant_domain"], name, domain) is None:
            raise TenantError(f"tenant {name} has no domain {domain}")

"""Operator controls over the queue: pause/resume a domain or tenant, retry deferred now, cancel by filter.

A pause parks the waiting recipients at the end of the due index (next attempt "infinity"), so claiming
stays an index range scan however much is paused; recipients that arrive while paused are skipped by the
claim's pause check. Resume makes the parked recipients due now.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from mtad.db.queries import queries


class ControlError(ValueError):
    pass


class QueueControls:
    def __init__(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        self._conn = conn
        self._sql = queries()

    async def _tenant_id(self, tenant: str | None) -> int | None:
        if tenant is None:
            return None
        tenant_id = await self._conn.fetchval(self._sql["tenant_id_by_name"], tenant)
        if tenant_id is None:
            raise ControlError(f"no tenant named {tenant}")
        return tenant_id

    async def pause(self, now: datetime, *, domain: str | None = None, tenant: str | None = None) -> int:
        return len(await self._conn.fetch(self._sql["pause"], domain, await self._tenant_id(tenant), now))

    async def resume(self, now: datetime, *, domain: str | None = None, tenant: str | None = None) -> int:
        resumed = await self._conn.fetch(self._sql["resume"], domain, await self._tenant_id(tenant), now)
        await self._conn.execute("SELECT pg_notify('mtad_queue', '')")
        return len(resumed)

    async def retry(self, now: datetime, *, domain: str | None = None, tenant: str | None = None) -> int:
        retried = await self._conn.fetch(self._sql["retry_deferred"], domain, await self._tenant_id(tenant), now)
        await self._conn.execute("SELECT pg_notify('mtad_queue', '')")
        return len(retried)

    async def cancel(
        self, now: datetime, *, domain: str | None = None, tenant: str | None = None, queue_id: str | None = None
    ) -> int:
        if domain is None and tenant is None and queue_id is None:
            raise ControlError("cancel needs --domain, --tenant or --queue-id: refusing to cancel the whole queue")
        rows = await self._conn.fetch(self._sql["cancel_pending"], domain, await self._tenant_id(tenant), queue_id, now)
        return len(rows)

    async def pauses(self) -> list[dict]:
        return [dict(r) for r in await self._conn.fetch(self._sql["list_pauses"])]

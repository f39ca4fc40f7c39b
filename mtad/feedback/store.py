"""Suppressions, unsubscribes and feedback events in PostgreSQL.

Every write here is scoped by tenant: a suppression belongs to one tenant and affects only its mail.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from mtad.db.queries import queries
from mtad.model import MessageClass, Reply

SUPPRESSION_REASONS = ("unsubscribed", "hard_bounce", "complaint", "manual")


@dataclass(frozen=True)
class TokenTarget:
    recipient_id: int
    tenant_id: int
    tenant: str
    address: str
    message_class: MessageClass
    list_id: str


class FeedbackStore:
    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        self._pool = pool
        self._sql = queries()

    async def target(self, tenant_id: int, recipient_id: int) -> TokenTarget | None:
        row = await self._pool.fetchrow(self._sql["recipient_for_token"], recipient_id, tenant_id)
        if row is None:
            return None
        return TokenTarget(
            row["id"], row["tenant_id"], row["tenant"], row["address"], MessageClass(row["class"]), row["list_id"]
        )

    async def unsubscribe(self, target: TokenTarget, *, all_lists: bool, source: str, now: datetime) -> int:
        """Suppress the address for the message's list (or all the tenant's marketing mail); returns how many
        still-queued marketing recipients were cancelled. One transaction."""
        list_id = "" if all_lists else target.list_id
        return await self._pool.fetchval(
            self._sql["unsubscribe"], target.recipient_id, target.tenant_id, list_id, source, now
        )

    async def suppress(
        self, tenant_id: int, address: str, reason: str, *, source: str, detail: str | None, now: datetime
    ) -> tuple[int, int]:
        """(added, cancelled): a tenant-wide suppression and its pending mail cancelled, in one statement."""
        if reason not in SUPPRESSION_REASONS or reason == "unsubscribed":
            raise ValueError(f"not a tenant-wide suppression reason: {reason}")
        row = await self._pool.fetchrow(self._sql["suppress_address"], tenant_id, address, reason, source, detail, now)
        return row["added"], row["cancelled"]

    async def unsuppress(self, tenant_id: int, address: str, reason: str | None) -> int:
        return len(await self._pool.fetch(self._sql["unsuppress_address"], tenant_id, address, reason))

    async def suppressions(self, tenant_id: int) -> list[asyncpg.Record]:
        return await self._pool.fetch(self._sql["list_suppressions"], tenant_id)

    async def record_event(
        self,
        recipient_id: int,
        kind: str,
        *,
        reply: Reply | None,
        category: str | None,
        source: str,
        now: datetime,
    ) -> None:
        await self._pool.fetchval(
            self._sql["record_feedback_event"],
            now,
            kind,
            reply.code if reply and reply.code else None,
            reply.enhanced if reply else None,
            reply.text if reply else None,
            category,
            source,
            recipient_id,
        )

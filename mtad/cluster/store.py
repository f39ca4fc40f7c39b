"""The cluster's tables (migration 0007) behind named queries (mtad/db/cluster.sql)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from mtad.db.queries import queries


@dataclass(frozen=True)
class Beat:
    live_nodes: int
    at: datetime  # the database's clock


@dataclass(frozen=True)
class SiteThrottle:
    site: str
    error: str | None
    throttled_at: datetime


@dataclass(frozen=True)
class NodeRow:
    id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    silent_s: float
    leased: int
    slots: int


class ClusterStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = queries()

    async def beat(
        self,
        node: str,
        host: str,
        pid: int,
        started_at: datetime,
        dead_after: timedelta,
        held_slots: Sequence[tuple[str, int]],
    ) -> Beat:
        row = await self._pool.fetchrow(
            self._sql["beat"],
            node,
            host,
            pid,
            started_at,
            dead_after,
            [site for site, _ in held_slots],
            [slot for _, slot in held_slots],
        )
        return Beat(row["live"], row["at"])

    async def leave(self, node: str) -> None:
        await self._pool.execute(self._sql["leave"], node)

    async def forget_dead_nodes(self, listed_for: timedelta, wants_for: timedelta) -> None:
        await self._pool.execute(self._sql["forget_dead_nodes"], listed_for, wants_for)

    async def take_slot(self, site: str, node: str, limit: int, ttl: timedelta) -> tuple[int | None, bool]:
        """(the slot taken or None, whether a slot was free: None and True means another node was faster)."""
        row = await self._pool.fetchrow(self._sql["take_slot"], site, node, limit, ttl)
        return row["slot"], row["free"]

    async def give_slots(self, node: str, slots: Sequence[tuple[str, int]]) -> None:
        await self._pool.execute(self._sql["give_slots"], node, [s for s, _ in slots], [n for _, n in slots])

    async def want_slot(self, site: str, node: str) -> None:
        await self._pool.execute(self._sql["want_slot"], site, node)

    async def slot_wants(self, node: str, recent: timedelta) -> list[str]:
        return [row["site"] for row in await self._pool.fetch(self._sql["slot_wants"], node, recent)]

    async def throttled(self, site: str, node: str, error: str | None) -> None:
        await self._pool.execute(self._sql["throttled"], site, node, error)

    async def throttles_since(self, node: str, since: datetime) -> list[SiteThrottle]:
        rows = await self._pool.fetch(self._sql["throttles_since"], node, since)
        return [SiteThrottle(r["site"], r["error"], r["throttled_at"]) for r in rows]

    async def silent_nodes_on_host(self, host: str, node: str, silent_for: timedelta) -> list[tuple[str, int]]:
        rows = await self._pool.fetch(self._sql["silent_nodes_on_host"], host, node, silent_for)
        return [(row["id"], row["pid"]) for row in rows]

    async def reap_node(self, node: str) -> tuple[bool, int]:
        """Forget a dead node: (whether this call removed it, how many of its leased recipients went back to
        the queue); a sibling that reaped it first leaves (False, 0)."""
        row = await self._pool.fetchrow(self._sql["reap_node"], node)
        return row["reaped"], row["released"]

    async def take_rate_tokens(self, site: str, rate_per_s: float, burst: float, want: int) -> int:
        return await self._pool.fetchval(self._sql["take_rate_tokens"], site, rate_per_s, burst, want)

    async def nodes(self) -> list[NodeRow]:
        return [NodeRow(**dict(row)) for row in await self._pool.fetch(self._sql["cluster_nodes"])]

"""Queue gauges refreshed in the background (every `interval_s`), never by a scrape.

Counts are for the states still in the queue (queued, deferred, active), exact up to `cap` and PostgreSQL's
estimate above it, each through its partial index (the state is written into the statement: a generic plan
with the state as a parameter would scan the table); finished states are counted by the event metrics.
The oldest pending age comes from an index too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timezone

import asyncpg

from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.db.queries import queries
from mtad.observe.metrics import DB_POOL, DB_UP, EVENT_LOOP_LAG, QUEUE_OLDEST_AGE, QUEUE_RECIPIENTS, READY

# State -> the index whose size estimates it beyond the cap.
_PENDING_STATES = {"queued": "recipients_due_idx", "deferred": "recipients_due_idx", "active": "recipients_lease_idx"}
_CAPPED_COUNT = {
    state: f"SELECT count(*) FROM (SELECT 1 FROM recipients WHERE state = '{state}' LIMIT $1) AS capped"
    for state in _PENDING_STATES
}


async def refresh_queue_gauges(pool: asyncpg.Pool, cap: int = 100_000) -> int:
    """Refresh the gauges; returns the recipients still in the queue (for back-pressure)."""
    sql = queries()
    pending = 0
    async with pool.acquire() as conn:
        for state, index in _PENDING_STATES.items():
            count = await conn.fetchval(_CAPPED_COUNT[state], cap)
            if count >= cap:
                count = max(count, await conn.fetchval(sql["estimate_rows"], index) or 0)
            QUEUE_RECIPIENTS.labels(state).set(count)
            pending += count
        oldest = await conn.fetchval(sql["oldest_pending_queued_at"])
    QUEUE_OLDEST_AGE.set((datetime.now(timezone.utc) - oldest).total_seconds() if oldest else 0)
    return pending


async def keep_gauges_fresh(
    pool: asyncpg.Pool,
    interval_s: float,
    listeners_up: Callable[[], bool],
    on_depth: Callable[[int], None] = lambda pending: None,
) -> None:
    """Also keeps mtad_db_up and mtad_ready current without anyone probing /readyz, and tells `on_depth`
    how many recipients are pending (submission's back-pressure)."""
    while True:
        DB_POOL.labels("in_use").set(pool.get_size() - pool.get_idle_size())
        DB_POOL.labels("idle").set(pool.get_idle_size())
        try:
            on_depth(await asyncio.wait_for(refresh_queue_gauges(pool), timeout=max(1.0, interval_s)))
            database_ok = True
        except (*DATABASE_UNAVAILABLE, asyncio.TimeoutError):
            database_ok = False
        DB_UP.set(1 if database_ok else 0)
        READY.set(1 if database_ok and listeners_up() else 0)
        await asyncio.sleep(interval_s)


async def measure_event_loop_lag(interval_s: float = 0.5) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        EVENT_LOOP_LAG.set(max(0.0, loop.time() - started - interval_s))

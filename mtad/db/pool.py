"""Connecting to PostgreSQL: the pool settings, and which exceptions mean "the database is unavailable"."""

from __future__ import annotations

import asyncpg

from mtad.config import DatabaseSettings

# jit off: the claim's anti-join (paused destinations) is estimated expensive at a million queued rows, which
# makes PostgreSQL spend ~140 ms JIT-compiling a query that runs in 0.5 ms (benchmarks/claim.py).
# force_custom_plan: asyncpg prepares every statement; after five runs PostgreSQL may keep a generic plan, made
# while the queue was small (a fresh database, before autovacuum's first ANALYZE) and blind to the length of
# the arrays mtad passes. That plan stayed while the queue grew: in benchmarks/relay.py (20,000 messages)
# PostgreSQL spent a whole core on outcome batches, 228 delivered/s and 5.75 CPU s per 1000 messages;
# planning each execution costs far less: 366 delivered/s and 3.28 CPU s.
SERVER_SETTINGS = {"application_name": "mtad", "jit": "off", "plan_cache_mode": "force_custom_plan"}

# Raised while PostgreSQL is down, restarting, or the connection was cut: callers answer "try again later".
# InternalClientError: asyncpg raises it ("cannot switch to state 12; another operation (2) is in progress")
# from a pooled connection whose backend was killed by pg_terminate_backend while it sat idle
# (MagicStack/asyncpg#1069); left out, it ended the outcome writer and the claim loop for good
# (tests/component/test_database_faults.py).
DATABASE_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PooledConnection(asyncpg.Connection):
    """No reset query on release. asyncpg's default (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) costs
    a round trip after every pooled query (6 % of the daemon's time in a py-spy profile of the relay
    benchmark); mtad keeps no session state on pooled connections: no SET, no LISTEN (the wake-up has its own
    connection), and the one advisory lock (migrations) is released explicitly."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        connection_class=PooledConnection,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings=SERVER_SETTINGS,
    )


async def connect(url: str, settings: DatabaseSettings) -> asyncpg.Connection:
    return await asyncpg.connect(
        url,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings=SERVER_SETTINGS,
    )

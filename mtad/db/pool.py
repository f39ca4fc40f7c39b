"""Connecting to PostgreSQL: the pool settings, and which exceptions mean "the database is unavailable"."""

from __future__ import annotations

import asyncpg

from mtad.config import DatabaseSettings

# jit off: the claim's anti-join (paused destinations) is estimated expensive at a million queued rows, which
# makes PostgreSQL spend ~140 ms JIT-compiling a query that runs in 0.5 ms (benchmarks/claim.py).
SERVER_SETTINGS = {"application_name": "mtad", "jit": "off"}

# The daemon's pool runs the same few statements thousands of times a second: each is planned once per
# connection (force_generic_plan), not at every execution. Planning was a third of PostgreSQL's CPU in the
# relay benchmark (pg_stat_statements: 5.2 of 14 s, the foreign-key checks' plans included). A generic plan
# cannot see how big the tables are now, and one made on a fresh, tiny queue would scan where an index finds
# the rows (every leased recipient, per outcome batch: a whole core once the queue had grown); with sequential
# scans, hash and merge joins disabled every statement reaches the queue through its indexes, driven by the few
# rows it is about, whatever the statistics said when it was planned. tests/integration/test_query_plans.py
# holds every statement the daemon runs to that.
DAEMON_SERVER_SETTINGS = {
    **SERVER_SETTINGS,
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}

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
        server_settings=DAEMON_SERVER_SETTINGS,
    )


async def connect(url: str, settings: DatabaseSettings) -> asyncpg.Connection:
    """One connection for operators' commands, migrations and LISTEN: statements that run once get plans made
    for their parameters."""
    return await asyncpg.connect(
        url,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings=SERVER_SETTINGS,
    )

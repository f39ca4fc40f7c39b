"""Connecting to PostgreSQL: the pool settings, and which exceptions mean "the database is unavailable"."""

from __future__ import annotations

import asyncpg

from mtad.config import DatabaseSettings

# Raised while PostgreSQL is down, restarting, or the connection was cut: callers answer "try again later".
DATABASE_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def create_pool(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings={"application_name": "mtad"},
    )


async def connect(url: str, settings: DatabaseSettings) -> asyncpg.Connection:
    return await asyncpg.connect(
        url,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings={"application_name": "mtad"},
    )

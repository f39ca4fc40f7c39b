"""Schema migrations: plain numbered .sql files applied in order, each in its own transaction.

In:  an asyncpg connection and the files in mtad/db/migrations (`NNNN_name.sql`).
Out: applied versions recorded in `mtad_schema_migrations`.
Invariant: two processes migrating at once serialise on an advisory lock, so each file runs exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_LOCK_KEY = 0x6D746164  # "mtad": one advisory lock for the whole migration run
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class SchemaError(RuntimeError):
    """The database schema does not match this build of mtad."""


def available_migrations() -> list[Migration]:
    folder = resources.files("mtad.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('mtad_schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await conn.fetch("SELECT version FROM mtad_schema_migrations")}


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet applied; returns those applied now."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS mtad_schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await applied_versions(conn)
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO mtad_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise SchemaError unless the database has exactly the migrations this build knows."""
    known = {m.version for m in available_migrations()}
    done = await applied_versions(conn)
    if done - known:
        raise SchemaError(
            f"database schema is newer than this mtad (versions {sorted(done - known)}); upgrade mtad"
        )
    if known - done:
        raise SchemaError(f"database schema is missing migrations {sorted(known - done)}; run `mtad migrate`")

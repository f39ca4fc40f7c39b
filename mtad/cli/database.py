"""`mtad db start|stop|status|url`, `mtad migrate`, and the connection every operator command uses."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from mtad.app import database_url, embedded_cluster
from mtad.config import Settings
from mtad.db.migrate import migrate
from mtad.db.pool import connect


def add_commands(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="manage the embedded PostgreSQL cluster")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    db.set_defaults(handler=run_db)
    migrate_cmd = commands.add_parser("migrate", help="apply pending schema migrations")
    migrate_cmd.set_defaults(handler=run_migrate)


def run_db(settings: Settings, args: argparse.Namespace) -> int:
    cluster = embedded_cluster(settings)
    if cluster is None:
        if args.action == "url":
            print(settings.database.url)
            return 0
        print("mtad: database.url is set: mtad uses that server and manages no embedded cluster")
        return 1
    if args.action == "start":
        print("started" if cluster.start() else "already running", cluster.status())
    elif args.action == "stop":
        cluster.stop()
        print(cluster.status())
    elif args.action == "status":
        print(cluster.status())
        return 0 if cluster.is_running() else 3  # like `systemctl status`: 3 = not running
    else:
        print(cluster.url())
    return 0


@contextlib.asynccontextmanager
async def operator_connection(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the daemon's database; an embedded cluster that is down is started and stopped again."""
    cluster = embedded_cluster(settings)
    started = cluster is not None and await asyncio.to_thread(cluster.start)
    try:
        conn = await connect(database_url(settings), settings.database)
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        if started:
            await asyncio.to_thread(cluster.stop)


def run_migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def apply() -> int:
        async with operator_connection(settings) as conn:
            applied = await migrate(conn)
        print(f"applied {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}" if applied else "schema up to date")
        return 0

    return asyncio.run(apply())

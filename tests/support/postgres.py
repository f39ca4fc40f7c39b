"""One private PostgreSQL for the whole test session (durable=False: the suite tests mtad, not fsync),
a migrated template database, and a fresh database cloned from it for every test that asks."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import asyncpg

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import migrate

TEMPLATE = "mtad_template"
_counter = itertools.count(1)


def start_test_cluster() -> tuple[EmbeddedPostgres, Path]:
    # /tmp (not pytest's 0700 tmp_path) so that, when the suite runs as root, the postgres user can reach it.
    root = Path(tempfile.mkdtemp(prefix="mtad-test-pg-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "pg", durable=False)
    cluster.start()
    return cluster, root


def stop_test_cluster(cluster: EmbeddedPostgres, root: Path) -> None:
    cluster.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


def url_for(cluster: EmbeddedPostgres, database: str) -> str:
    base = cluster.url()
    head, _, tail = base.partition("?")
    return head.rsplit("/", 1)[0] + "/" + database + ("?" + tail if tail else "")


async def create_template(cluster: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url_for(cluster, TEMPLATE))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def create_test_database(cluster: EmbeddedPostgres) -> str:
    name = f"mtad_test_{next(_counter)}"
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    return name


async def drop_test_database(cluster: EmbeddedPostgres, name: str) -> None:
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()

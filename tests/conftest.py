"""Fixtures shared by the integration and component tests. PostgreSQL is real, never mocked."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from support.postgres import (
    create_template,
    create_test_database,
    drop_test_database,
    start_test_cluster,
    stop_test_cluster,
    url_for,
)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster, root = start_test_cluster()
    asyncio.run(create_template(cluster))
    yield cluster
    stop_test_cluster(cluster, root)


@pytest.fixture
async def db_url(pg_cluster):
    """A fresh, migrated database for one test."""
    name = await create_test_database(pg_cluster)
    yield url_for(pg_cluster, name)
    await drop_test_database(pg_cluster, name)


@pytest.fixture
async def pool(db_url):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=8)
    yield pool
    await pool.close()

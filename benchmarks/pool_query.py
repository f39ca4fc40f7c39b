"""Cost of one pooled query: asyncpg's default connection reset on release vs mtad's PooledConnection.

    .venv/bin/python benchmarks/pool_query.py

Starts a private durable PostgreSQL and times 3,000 `SELECT 1` through a 4-connection pool, one after
another and 20-way concurrent, twice per connection class.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
import time

import asyncpg

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.pool import PooledConnection

QUERIES = 3000


async def measure(url: str, connection_class: type) -> tuple[float, float]:
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4, connection_class=connection_class)
    try:
        for _ in range(200):
            await pool.fetchval("SELECT 1")
        started = time.perf_counter()
        for _ in range(QUERIES):
            await pool.fetchval("SELECT 1")
        sequential_us = (time.perf_counter() - started) / QUERIES * 1e6
        started = time.perf_counter()
        await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(QUERIES)))
        concurrent_us = (time.perf_counter() - started) / QUERIES * 1e6
    finally:
        await pool.close()
    return sequential_us, concurrent_us


async def main() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="mtad-bench-pool-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "pg", durable=True)
    cluster.start()
    try:
        print("| connection class | sequential µs/query | 20-way µs/query |\n|---|---:|---:|")
        for _ in range(2):
            for name, cls in (("asyncpg default (reset on release)", asyncpg.Connection),
                              ("mtad PooledConnection (no reset)", PooledConnection)):
                sequential, concurrent = await measure(cluster.url(), cls)
                print(f"| {name} | {sequential:.0f} | {concurrent:.0f} |")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

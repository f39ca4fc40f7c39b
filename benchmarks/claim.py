"""Claim latency against queue depth: does leasing a batch stay fast with a million recipients queued?

Starts a private durable PostgreSQL, fills the queue with N queued recipients (COPY-speed generate_series),
ANALYZEs, then drains the head of the queue the way the daemon does, with its connection settings and so its
plans: claim a batch (`claim_due`, 200 per batch by default), record each recipient delivered
(`record_outcomes`), repeat; and times both. Prints a
Markdown table per depth: claim and record latency p50/p95/max, the indexes the claim plan uses.

    .venv/bin/python benchmarks/claim.py --depths 10000,1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import migrate
from mtad.db.pool import DAEMON_SERVER_SETTINGS
from mtad.db.queries import queries
from mtad.model import Reply
from mtad.queue.store import QueueStore

NOW = datetime.now(timezone.utc)


async def fill(conn: asyncpg.Connection, depth: int) -> None:
    await conn.execute("TRUNCATE recipients, messages, events, tenants RESTART IDENTITY CASCADE")
    tenant = await conn.fetchval("INSERT INTO tenants (name, password_hash) VALUES ('bench', 'x') RETURNING id")
    message = await conn.fetchval(
        "INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, received_at, body) "
        "VALUES ('BENCH', $1, 'a@bench.example', 1, $2, 'x') RETURNING id",
        tenant,
        NOW,
    )
    await conn.execute(
        """INSERT INTO recipients (message_id, tenant_id, address, domain, queued_at, next_attempt_at, updated_at)
           SELECT $1, $2, 'r' || g || '@d' || (g % 10000) || '.example', 'd' || (g % 10000) || '.example',
                  $3::timestamptz, $3::timestamptz - g * interval '1 ms', $3::timestamptz
           FROM generate_series(1, $4) AS g""",
        message,
        tenant,
        NOW,
        depth,
    )
    await conn.execute("VACUUM ANALYZE recipients")


def index_used(plan: list) -> list[str]:
    found, stack = [], [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if node.get("Index Name"):
            found.append(node["Index Name"])
        stack += node.get("Plans", [])
    return found


async def measure(url: str, depth: int, batches: int, batch_size: int) -> dict:
    conn = await asyncpg.connect(url)
    started = time.monotonic()
    await fill(conn, depth)
    fill_s = time.monotonic() - started
    await conn.close()
    # The daemon's connection settings: each statement planned once per connection (mtad.db.pool).
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2, server_settings=DAEMON_SERVER_SETTINGS)
    async with pool.acquire() as probe:  # the plan the daemon's connections keep
        await probe.execute(f"PREPARE claim_probe AS {queries()['claim_due']}")
        plan = json.loads(await probe.fetchval("EXPLAIN (FORMAT JSON) EXECUTE claim_probe($1, $2, $3, $4)",
                                               NOW, batch_size, "b", 60.0))
        await probe.execute("DEALLOCATE claim_probe")
    store = QueueStore(pool)
    claim_ms, record_ms = [], []
    delivered = Reply(250, "2.0.0", "ok")
    for _ in range(batches):
        t0 = time.perf_counter()
        claims = await store.claim("bench", batch_size, 60, NOW + timedelta(seconds=1))
        t1 = time.perf_counter()
        await store.complete("bench", [c.recipient_id for c in claims], delivered, NOW)
        claim_ms.append((t1 - t0) * 1000)
        record_ms.append((time.perf_counter() - t1) * 1000)
    await pool.close()
    return {"depth": depth, "fill_s": round(fill_s, 1), "claim": _percentiles(claim_ms),
            "record": _percentiles(record_ms), "indexes": sorted(set(index_used(plan)))}


def _percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 2), "p95": round(values[int(len(values) * 0.95) - 1], 2),
            "max": round(values[-1], 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="10000,1000000")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mtad-bench-claim-"))
    root.chmod(0o755)
    cluster = EmbeddedPostgres(root / "pg", durable=True)
    try:
        cluster.start()
        conn = await asyncpg.connect(cluster.url())
        await migrate(conn)
        await conn.close()
        results = [await measure(cluster.url(), int(d), args.batches, args.batch_size) for d in args.depths.split(",")]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"batches of {args.batch_size}, {args.batches} batches per depth")
    print("| queued recipients | claim p50 / p95 / max ms | record p50 / p95 / max ms | claim plan indexes |")
    print("|---:|---|---|---|")
    for r in results:
        claim, record = r["claim"], r["record"]
        print(f"| {r['depth']:,} | {claim['p50']} / {claim['p95']} / {claim['max']} "
              f"| {record['p50']} / {record['p95']} / {record['max']} | {', '.join(r['indexes'])} |")


if __name__ == "__main__":
    asyncio.run(main())

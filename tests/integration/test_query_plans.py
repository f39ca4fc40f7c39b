"""The daemon's statements are planned once per connection (generic plans), so each plan must hold whatever the
tables looked like when it was made: the queue's big tables are reached through their indexes only.

A generic plan made on a fresh database once scanned every leased recipient for each outcome batch (a whole
core of PostgreSQL in the relay benchmark); these tests make the plans on an empty schema and on a small,
analysed one, the two moments at which a daemon's first statements are planned.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pytest

from mtad.config import DatabaseSettings
from mtad.db.pool import connect, create_pool
from mtad.db.queries import queries

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
QUEUE_TABLES = {"recipients", "messages", "events", "suppressions"}

# Operators' statements run on their own connection (mtad.db.pool.connect), planned for their parameters at
# every execution; the daemon never runs them.
OPERATOR_STATEMENTS = {
    "insert_tenant", "set_tenant_password", "list_tenants", "add_tenant_domain", "remove_tenant_domain",
    "count_by_state", "count_pending_by_domain", "count_pending_by_tenant", "oldest_pending", "message_by_queue_id",
    "recipients_of_message", "events_of_message", "pause", "resume", "list_pauses", "retry_deferred",
    "cancel_pending", "tenant_id_by_name", "site_statuses", "unsuppress_address", "list_suppressions",
    "events_by_recipient", "events_by_message", "cluster_nodes",
}
# The daemon's statements that read every leased row by their nature, through the lease index: rare events.
LEASE_SCANS = {
    "release_owner": "a clean stop: every row this node leases",
    "reap_node": "a dead node: every row it leased",
}


def _queue_scans(node: dict):
    """(node type, relation or index, has an index condition) for every scan of a queue table in the plan."""
    relation = node.get("Relation Name") or node.get("Index Name", "").partition("_")[0]  # bitmap index scans
    if relation in QUEUE_TABLES:
        condition = "Index Cond" in node or "Recheck Cond" in node
        yield node["Node Type"], node.get("Index Name") or relation, condition
    for child in node.get("Plans", []):
        yield from _queue_scans(child)


def _full_scans(plan: dict) -> list[tuple[str, str]]:
    return [
        (kind, where)
        for kind, where, condition in _queue_scans(plan)
        if kind == "Seq Scan" or (kind in ("Index Scan", "Index Only Scan") and not condition)
    ]


async def _generic_plans(pool) -> dict[str, dict]:
    """Every named statement's generic plan (the one the daemon's connections keep), by name."""
    plans = {}
    async with pool.acquire() as conn:
        for name, sql in queries().items():
            params = max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)
            await conn.execute(f"PREPARE probe AS {sql}")
            try:
                arguments = f"({', '.join(['NULL'] * params)})" if params else ""
                text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE probe{arguments}")
                plans[name] = json.loads(text)[0]["Plan"]
            finally:
                await conn.execute("DEALLOCATE probe")
    return plans


async def _small_analysed_queue(url: str) -> None:
    conn = await connect(url, DatabaseSettings())
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name, password_hash) VALUES ('t', 'x') RETURNING id")
        message = await conn.fetchval(
            "INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, received_at, body) "
            "VALUES ('Q1', $1, 'a@acme.example', 1, $2, 'x') RETURNING id",
            tenant,
            NOW,
        )
        await conn.execute(
            """INSERT INTO recipients (message_id, tenant_id, address, domain, state, queued_at, next_attempt_at,
                                       updated_at, lease_owner, lease_expires_at)
               SELECT $1, $2, 'r' || g || '@x.example', 'x.example', CASE WHEN g % 2 = 0 THEN 'active' ELSE 'queued' END,
                      $3::timestamptz, $3, $3, CASE WHEN g % 2 = 0 THEN 'n' END, CASE WHEN g % 2 = 0 THEN $3 END
               FROM generate_series(1, 5) AS g""",
            message,
            tenant,
            NOW,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


@pytest.mark.parametrize("queue", ["empty", "small and analysed"])
async def test_generic_plans_reach_the_queue_tables_through_index_conditions(db_url, queue):
    if queue != "empty":
        await _small_analysed_queue(db_url)
    pool = await create_pool(db_url, DatabaseSettings(pool_min_size=1, pool_max_size=1))
    try:
        plans = await _generic_plans(pool)
    finally:
        await pool.close()
    assert OPERATOR_STATEMENTS | set(LEASE_SCANS) <= set(plans), "an exempted statement no longer exists"
    daemon = set(plans) - OPERATOR_STATEMENTS
    scanning = {name: _full_scans(plans[name]) for name in daemon - set(LEASE_SCANS)}
    assert {name: scans for name, scans in scanning.items() if scans} == {}
    for name in LEASE_SCANS:
        assert {where for _, where in _full_scans(plans[name])} == {"recipients_lease_idx"}
    # the hot path in particular: outcomes by primary key, the claim by the due index
    assert any(where == "recipients_pkey" for _, where, _ in _queue_scans(plans["record_outcomes"]))
    assert any(where == "recipients_due_idx" for _, where, _ in _queue_scans(plans["claim_due"]))


async def test_the_daemon_plans_once_and_operators_plan_for_their_parameters(db_url):
    """The daemon's pool keeps generic plans without sequential scans; an operator's one-off statement (and a
    migration) is planned for its own parameters, as PostgreSQL does by default."""
    pool = await create_pool(db_url, DatabaseSettings(pool_min_size=1, pool_max_size=1))
    operator = await connect(db_url, DatabaseSettings())
    try:
        assert await pool.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        assert await pool.fetchval("SHOW enable_seqscan") == "off"
        assert await operator.fetchval("SHOW plan_cache_mode") == "auto"
        assert await operator.fetchval("SHOW enable_seqscan") == "on"
    finally:
        await operator.close()
        await pool.close()

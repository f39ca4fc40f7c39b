"""The queue store against a real PostgreSQL: storing, claiming under leases, outcomes, reclaiming, plan."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from mtad.db.migrate import available_migrations, check_schema, migrate
from mtad.db.queries import queries
from mtad.model import EnvelopeRecipient, RecipientState, Reply, Submission
from mtad.queue.claimer import Claimer
from mtad.queue.store import Outcome, QueueStore
from mtad.queue.wakeup import ArrivalSignal, QueueWakeup
from mtad.tenants.store import TenantStore

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
OK = Reply(250, "2.0.0", "ok")


async def make_tenant(pool, name="acme") -> int:
    return await TenantStore(pool).insert_tenant(name, "argon2-hash-not-used-here")


def submission(tenant_id: int, queue_id: str, recipients: list[str], at: datetime = NOW) -> Submission:
    return Submission(
        queue_id=queue_id,
        tenant_id=tenant_id,
        mail_from="news@acme.example",
        recipients=tuple(EnvelopeRecipient(r, r.split("@")[1]) for r in recipients),
        body=b"From: news@acme.example\r\n\r\nhello\r\n",
        client_ip="192.0.2.0",
        received_at=at,
    )


async def states(pool) -> dict[str, str]:
    return {r["address"]: r["state"] for r in await pool.fetch("SELECT address, state FROM recipients")}


async def test_a_submission_is_stored_once_with_one_row_per_recipient(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example", "b@y.example", "c@x.example"]))
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    assert await states(pool) == {a: "queued" for a in ("a@x.example", "b@y.example", "c@x.example")}
    body = await pool.fetchval("SELECT body FROM messages WHERE queue_id = 'Q1'")
    assert body == b"From: news@acme.example\r\n\r\nhello\r\n"


async def test_a_large_body_is_stored_lz4_compressed_and_read_back_unchanged(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    html = b"".join(b'<tr><td class="cell">row %d of the newsletter</td></tr>\r\n' % n for n in range(400))
    body = b"From: news@acme.example\r\n\r\n" + html
    await store.insert_submission(dataclasses.replace(submission(tenant, "Q1", ["a@x.example"]), body=body))
    stored = await pool.fetchrow(
        "SELECT body, pg_column_compression(body) AS method, pg_column_size(body) AS size FROM messages"
    )
    assert stored["body"] == body
    assert stored["method"] == "lz4"
    assert stored["size"] < len(body) / 3


async def test_a_failing_submission_leaves_nothing_behind(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example"]))
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.insert_submission(submission(tenant, "Q1", ["b@x.example"]))  # same queue id
    assert await pool.fetchval("SELECT count(*) FROM recipients") == 1


async def test_claim_leases_due_recipients_and_not_future_ones(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["now@x.example"]))
    await store.insert_submission(submission(tenant, "Q2", ["later@x.example"], at=NOW + timedelta(hours=1)))
    claims = await store.claim("node-a", 10, 60, NOW)
    assert [c.address for c in claims] == ["now@x.example"]
    assert claims[0].queue_id == "Q1" and claims[0].mail_from == "news@acme.example"
    assert claims[0].lease_expires_at == NOW + timedelta(seconds=60)
    assert await states(pool) == {"now@x.example": "active", "later@x.example": "queued"}


async def test_two_concurrent_claimers_never_get_the_same_recipient(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    for n in range(40):
        await store.insert_submission(submission(tenant, f"Q{n}", [f"r{n}-{k}@x.example" for k in range(25)]))

    async def claim_all(owner: str) -> list[int]:
        got = []
        while batch := await store.claim(owner, 17, 60, NOW):
            got += [c.recipient_id for c in batch]
        return got

    first, second = await asyncio.gather(claim_all("node-a"), claim_all("node-b"))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 1000
    assert len(set(first)) == len(first) and len(set(second)) == len(second)


async def test_only_the_lease_owner_can_record_an_outcome(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example"]))
    (claim,) = await store.claim("node-a", 10, 60, NOW)
    assert await store.complete("node-b", [claim.recipient_id], OK, NOW) == set()
    assert await store.complete("node-a", [claim.recipient_id], OK, NOW) == {claim.recipient_id}
    row = await pool.fetchrow("SELECT state, attempts, last_code, lease_owner FROM recipients")
    assert dict(row) == {"state": "delivered", "attempts": 1, "last_code": 250, "lease_owner": None}
    event = await pool.fetchrow("SELECT kind, code, enhanced FROM events")
    assert dict(event) == {"kind": "delivered", "code": 250, "enhanced": "2.0.0"}


async def test_defer_sets_the_retry_time_and_bounce_is_final(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["soft@x.example", "hard@x.example"]))
    claims = {c.address: c for c in await store.claim("n", 10, 60, NOW)}
    retry_at = NOW + timedelta(minutes=5)
    await store.record_outcomes(
        "n",
        [
            Outcome(claims["soft@x.example"].recipient_id, RecipientState.DEFERRED, Reply(450, "4.2.0", "busy"), retry_at),
            Outcome(claims["hard@x.example"].recipient_id, RecipientState.BOUNCED, Reply(550, "5.1.1", "no such user")),
        ],
        NOW,
    )
    assert await states(pool) == {"soft@x.example": "deferred", "hard@x.example": "bounced"}
    assert await store.claim("n", 10, 60, NOW + timedelta(minutes=4)) == []
    (again,) = await store.claim("n", 10, 60, retry_at)
    assert again.address == "soft@x.example" and again.attempts == 1


async def test_an_outcome_must_be_a_legal_transition():
    with pytest.raises(ValueError):
        Outcome(1, RecipientState.QUEUED, None)
    with pytest.raises(ValueError):
        Outcome(1, RecipientState.DEFERRED, OK)  # no retry time
    with pytest.raises(ValueError):
        Outcome(1, RecipientState.SUPPRESSED, None)


async def test_release_gives_leases_back_without_counting_an_attempt(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example"]))
    (claim,) = await store.claim("n", 10, 60, NOW)
    assert await store.release("n", [claim.recipient_id], NOW) == {claim.recipient_id}
    (again,) = await store.claim("m", 10, 60, NOW)
    assert again.recipient_id == claim.recipient_id and again.attempts == 0


async def test_held_leases_are_extended_and_a_clean_stop_gives_back_all_of_an_owners_leases(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example", "b@x.example"]))
    await store.insert_submission(submission(tenant, "Q2", ["c@x.example"]))
    claims = await store.claim("n", 10, 30, NOW)
    held = [c.recipient_id for c in claims if c.address != "c@x.example"]
    await store.extend_leases("n", held, NOW + timedelta(seconds=20), 30)
    await store.extend_leases("someone-else", [c.recipient_id for c in claims], NOW + timedelta(seconds=20), 300)
    assert await store.reclaim_expired(NOW + timedelta(seconds=31)) == 1  # c: not renewed
    assert await store.release_owner("n", NOW + timedelta(seconds=32)) == 2  # a, b: renewed to 50 s
    assert await states(pool) == {"a@x.example": "queued", "b@x.example": "queued", "c@x.example": "queued"}


async def test_the_messages_of_a_batch_load_in_one_query(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example"]))
    await store.insert_submission(submission(tenant, "Q2", ["b@x.example"]))
    ids = [c.message_id for c in await store.claim("n", 10, 30, NOW)]
    loaded = await store.load_messages(ids + [999_999])  # one unknown: simply absent
    assert sorted((m.id, m.queue_id) for m in loaded) == sorted(zip(ids, ["Q1", "Q2"]))
    assert loaded[0].body == b"From: news@acme.example\r\n\r\nhello\r\n"


async def test_an_expired_lease_is_reclaimed_and_claimed_by_another_node(pool):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    await store.insert_submission(submission(tenant, "Q1", ["a@x.example", "b@x.example"]))
    await store.claim("dead-node", 10, 30, NOW)
    assert await store.reclaim_expired(NOW + timedelta(seconds=29)) == 0  # lease still valid
    assert await store.claim("live-node", 10, 30, NOW + timedelta(seconds=29)) == []
    assert await store.reclaim_expired(NOW + timedelta(seconds=31)) == 2
    claims = await store.claim("live-node", 10, 30, NOW + timedelta(seconds=31))
    assert len(claims) == 2
    # the dead node comes back to life: its late outcome changes nothing
    assert await store.complete("dead-node", [c.recipient_id for c in claims], OK, NOW) == set()
    kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM events ORDER BY id")]
    assert kinds == ["reclaimed", "reclaimed"]


async def test_notify_wakes_a_waiting_claimer_long_before_its_poll_interval(pool, db_url):
    store = QueueStore(pool)
    tenant = await make_tenant(pool)
    wakeup = QueueWakeup(lambda: asyncpg.connect(db_url))
    listener = asyncio.create_task(wakeup.run())
    try:
        while not wakeup.listening:
            await asyncio.sleep(0.01)
        await wakeup.wait(0)  # consume the wake-up that listening itself gives
        claimer = Claimer(
            store, wakeup, owner="n", batch_size=10, lease_s=60, poll_interval_s=3600,
            clock=lambda: datetime.now(timezone.utc),
        )
        waiting = asyncio.create_task(claimer.next_batch(capacity=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await store.insert_submission(submission(tenant, "Q1", ["a@x.example"], at=datetime.now(timezone.utc)))
        ArrivalSignal(pool, local=None).queued()  # what another node's ingest does after storing
        claims = await asyncio.wait_for(waiting, timeout=30)  # an hour's poll interval: only NOTIFY can do this
        assert [c.address for c in claims] == ["a@x.example"]
    finally:
        listener.cancel()


async def test_the_listener_reconnects_after_its_connection_is_killed(pool, db_url):
    wakeup = QueueWakeup(lambda: asyncpg.connect(db_url))
    listener = asyncio.create_task(wakeup.run())
    try:
        while not wakeup.listening:
            await asyncio.sleep(0.01)
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert killed == 1
        while wakeup.listening:
            await asyncio.sleep(0.01)
        while not wakeup.listening:
            await asyncio.sleep(0.05)
        await wakeup.wait(0)
        await pool.execute("NOTIFY mtad_queue")
        assert await wakeup.wait(30)
    finally:
        listener.cancel()


async def test_claim_uses_the_partial_due_index_with_a_large_history(pool):
    tenant = await make_tenant(pool)
    await pool.execute(
        "INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, received_at, body) "
        "VALUES ('BULK', $1, 'a@acme.example', 1, $2, 'x')",
        tenant,
        NOW,
    )
    # 300,000 finished recipients and 20,000 queued ones: the claim must not scan the history.
    await pool.execute(
        """INSERT INTO recipients (message_id, tenant_id, address, domain, state, queued_at, next_attempt_at, updated_at)
           SELECT (SELECT id FROM messages), $1, 'r' || g || '@x.example', 'x.example',
                  CASE WHEN g <= 300000 THEN 'delivered' ELSE 'queued' END, $2::timestamptz,
                  $2::timestamptz + g * interval '1 ms', $2::timestamptz
           FROM generate_series(1, 320000) AS g""",
        tenant,
        NOW,
    )
    await pool.execute("ANALYZE recipients")
    plan = await pool.fetchval(
        "EXPLAIN (FORMAT JSON) " + queries()["claim_due"], NOW + timedelta(days=1), 200, "n", 60.0
    )
    scans = list(_plan_nodes(json.loads(plan)[0]["Plan"]))
    recipient_scans = [node for node in scans if node.get("Relation Name") == "recipients" and "Scan" in node["Node Type"]]
    assert {node.get("Index Name") for node in recipient_scans} >= {"recipients_due_idx"}
    assert not [node for node in recipient_scans if node["Node Type"] == "Seq Scan"]


def _plan_nodes(node):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def test_migrations_are_idempotent_and_the_schema_check_passes(pool):
    async with pool.acquire() as conn:
        assert await migrate(conn) == []
        await check_schema(conn)
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM mtad_schema_migrations")]
    assert versions == [m.version for m in available_migrations()]

"""Group commit against a real PostgreSQL: concurrent submissions share statements, answers stay per message."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import asyncpg
import pytest

from mtad.model import EnvelopeRecipient, MessageClass, Submission
from mtad.queue.group_commit import GroupCommit
from mtad.queue.store import QueueStore
from mtad.tenants.store import TenantStore

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)


class CountingStore(QueueStore):
    """The real store, counting the statements it runs (which batches went to PostgreSQL together)."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.batches: list[list[str]] = []

    async def insert_submissions(self, submissions):
        self.batches.append([s.queue_id for s in submissions])
        return await super().insert_submissions(submissions)


def submission(tenant_id: int, queue_id: str, recipients: list[str], mail_from: str = "news@acme.example",
               message_class: MessageClass = MessageClass.MARKETING) -> Submission:
    return Submission(
        queue_id=queue_id,
        tenant_id=tenant_id,
        mail_from=mail_from,
        recipients=tuple(EnvelopeRecipient(r, r.split("@")[1]) for r in recipients),
        body=f"From: {mail_from}\r\nSubject: {queue_id}\r\n\r\nhello\r\n".encode(),
        client_ip="192.0.2.0",
        received_at=NOW,
        message_class=message_class,
    )


async def test_concurrent_submissions_are_stored_in_fewer_statements_each_whole(pool):
    tenant = await TenantStore(pool).insert_tenant("acme", "hash")
    store = CountingStore(pool)
    group = GroupCommit(store, max_in_flight=1)
    subs = [submission(tenant, f"Q{n}", [f"r{n}-{k}@x{k}.example" for k in range(n % 3 + 1)]) for n in range(30)]
    answers = await asyncio.gather(*(group.store(s) for s in subs))
    assert answers == [{}] * 30
    assert 1 < len(store.batches) < 30  # the first went alone, the rest piled up behind it
    assert sorted(q for batch in store.batches for q in batch) == sorted(s.queue_id for s in subs)
    rows = await pool.fetch(
        "SELECT m.queue_id, m.body, count(r.id) AS recipients FROM messages m JOIN recipients r ON r.message_id = m.id"
        " GROUP BY m.queue_id, m.body"
    )
    stored = {row["queue_id"]: (row["body"], row["recipients"]) for row in rows}
    assert stored == {s.queue_id: (s.body, len(s.recipients)) for s in subs}


async def test_suppressions_in_one_batch_apply_to_their_own_tenant_and_message_only(pool):
    tenants = TenantStore(pool)
    acme, other = await tenants.insert_tenant("acme", "hash"), await tenants.insert_tenant("other", "hash")
    await pool.execute(
        "INSERT INTO suppressions (tenant_id, address, reason) VALUES ($1, 'gone@x.example', 'unsubscribed')", acme
    )
    store = CountingStore(pool)
    group = GroupCommit(store, max_in_flight=1)
    first = asyncio.create_task(group.store(submission(acme, "WARMUP", ["w@x.example"])))
    await asyncio.sleep(0)  # the warm-up batch is in flight: the next three wait and go together
    marketing, account, others = await asyncio.gather(
        group.store(submission(acme, "A1", ["gone@x.example", "stays@x.example"])),
        group.store(submission(acme, "A2", ["gone@x.example"], message_class=MessageClass.TRANSACTIONAL)),
        group.store(submission(other, "B1", ["gone@x.example"])),
    )
    await first
    assert store.batches[1:] == [["A1", "A2", "B1"]]
    assert marketing == {"gone@x.example": "unsubscribed"}
    assert account == {}  # account mail is exempt from unsubscribes
    assert others == {}  # acme's unsubscribe is acme's alone
    states = {
        (row["queue_id"], row["address"]): row["state"]
        for row in await pool.fetch(
            "SELECT m.queue_id, r.address, r.state FROM recipients r JOIN messages m ON m.id = r.message_id"
        )
    }
    assert states == {
        ("WARMUP", "w@x.example"): "queued",
        ("A1", "gone@x.example"): "suppressed",
        ("A1", "stays@x.example"): "queued",
        ("A2", "gone@x.example"): "queued",
        ("B1", "gone@x.example"): "queued",
    }
    assert await pool.fetchval("SELECT count(*) FROM events WHERE kind = 'suppressed'") == 1


async def test_a_message_postgresql_refuses_fails_alone_and_the_rest_of_its_batch_is_stored(pool):
    tenant = await TenantStore(pool).insert_tenant("acme", "hash")
    store = CountingStore(pool)
    await store.insert_submission(submission(tenant, "TAKEN", ["first@x.example"]))
    group = GroupCommit(store, max_in_flight=1)
    first = asyncio.create_task(group.store(submission(tenant, "WARMUP", ["w@x.example"])))
    await asyncio.sleep(0)
    results = await asyncio.gather(
        group.store(submission(tenant, "OK1", ["a@x.example"])),
        group.store(submission(tenant, "TAKEN", ["b@x.example"])),  # queue id already stored
        group.store(submission(tenant, "NUL", ["c@x.example"], mail_from="bad\x00@x.example")),  # text cannot hold NUL
        group.store(submission(tenant, "OK2", ["d@x.example"])),
        return_exceptions=True,
    )
    await first
    assert results[0] == {} and results[3] == {}
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    assert isinstance(results[2], asyncpg.DataError)
    queued = {row["address"] for row in await pool.fetch("SELECT address FROM recipients")}
    assert queued == {"first@x.example", "w@x.example", "a@x.example", "d@x.example"}
    assert ["OK1", "TAKEN", "NUL", "OK2"] in store.batches  # tried together first, then one by one


async def test_an_unavailable_database_fails_every_message_of_the_batch_and_the_next_batch_works(pool, db_url):
    tenant = await TenantStore(pool).insert_tenant("acme", "hash")
    broken = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    await broken.close()
    group = GroupCommit(QueueStore(broken))
    results = await asyncio.gather(
        *(group.store(submission(tenant, f"Q{n}", [f"r{n}@x.example"])) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, asyncpg.InterfaceError) for r in results)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0
    group = GroupCommit(QueueStore(pool))
    assert await group.store(submission(tenant, "LATER", ["later@x.example"])) == {}


async def test_a_session_that_goes_away_does_not_take_the_batch_with_it(pool):
    tenant = await TenantStore(pool).insert_tenant("acme", "hash")
    group = GroupCommit(QueueStore(pool), max_in_flight=1)
    gone = asyncio.create_task(group.store(submission(tenant, "GONE", ["g@x.example"])))
    staying = asyncio.create_task(group.store(submission(tenant, "STAYS", ["s@x.example"])))
    await asyncio.sleep(0)
    gone.cancel()
    assert await staying == {}
    with pytest.raises(asyncio.CancelledError):
        await gone
    # the cancelled session's message was already on its way: stored (the client saw no 250 and may resend)
    assert {r["queue_id"] for r in await pool.fetch("SELECT queue_id FROM messages")} == {"GONE", "STAYS"}

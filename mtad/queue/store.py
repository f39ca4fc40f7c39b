"""The queue store: the only code that writes messages and recipient states.

In:  a `Submission` from ingest; claims, outcomes and releases from delivery (each with `now` and the
     claiming node's `owner` name).
Out: stored rows and events; `Claim`s for delivery.
Invariants:
- a submission is stored whole (one statement) or not at all; only then does ingest answer 250;
- a recipient is leased by one owner at a time (FOR UPDATE SKIP LOCKED), and only that owner can finish it:
  outcomes and releases for a lease that was reclaimed change nothing and say so;
- every outcome writes its event row in the same statement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from mtad.db.queries import queries
from mtad.model import Claim, MessageClass, Reply, RecipientState, Submission, can_transition


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended in, for one recipient."""

    recipient_id: int
    state: RecipientState  # delivered, deferred, bounced, expired, or cancelled (unsubscribed before the attempt)
    reply: Reply | None
    next_attempt_at: datetime | None = None  # required for deferred
    site: str | None = None
    mx_host: str | None = None
    tls_version: str | None = None
    duration_ms: int | None = None
    category: str | None = None  # bounce category of the reply (policy.bounce_rules)
    hard: bool = False  # a hard bounce: the address is suppressed for the tenant

    def __post_init__(self) -> None:
        if not can_transition(RecipientState.ACTIVE, self.state) or self.state is RecipientState.QUEUED:
            raise ValueError(f"an attempt cannot end in state {self.state}")
        if (self.state is RecipientState.DEFERRED) != (self.next_attempt_at is not None):
            raise ValueError("a deferral, and only a deferral, has a next attempt time")


@dataclass(frozen=True)
class StoredMessage:
    id: int
    queue_id: str
    tenant_id: int
    mail_from: str
    smtputf8: bool
    body: bytes
    message_class: MessageClass = MessageClass.MARKETING
    list_id: str = ""


class QueueStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = queries()

    async def insert_submission(self, submission: Submission) -> dict[str, str]:
        """Store the message; returns the recipients stored as suppressed, with the reason."""
        return (await self.insert_submissions([submission]))[0]

    async def insert_submissions(self, submissions: Sequence[Submission]) -> list[dict[str, str]]:
        """Store the messages together (all or none); per message, the recipients stored as suppressed."""
        rows = await self._pool.fetch(
            self._sql["insert_submissions"],
            [s.queue_id for s in submissions],
            [s.tenant_id for s in submissions],
            [s.mail_from for s in submissions],
            [len(s.body) for s in submissions],
            [s.smtputf8 for s in submissions],
            [s.client_ip for s in submissions],
            [s.received_at for s in submissions],
            [s.body for s in submissions],
            [s.message_class.value for s in submissions],
            [s.list_id for s in submissions],
            [s.queue_id for s in submissions for _ in s.recipients],
            [r.address for s in submissions for r in s.recipients],
            [r.domain for s in submissions for r in s.recipients],
        )
        suppressed: dict[str, dict[str, str]] = {s.queue_id: {} for s in submissions}
        for row in rows:
            suppressed[row["queue_id"]][row["address"]] = row["suppressed_because"]
        return [suppressed[s.queue_id] for s in submissions]

    async def claim(self, owner: str, limit: int, lease_s: float, now: datetime) -> list[Claim]:
        rows = await self._pool.fetch(self._sql["claim_due"], now, limit, owner, lease_s)
        return [
            Claim(
                recipient_id=row["id"],
                message_id=row["message_id"],
                queue_id=row["queue_id"],
                tenant_id=row["tenant_id"],
                mail_from=row["mail_from"],
                address=row["address"],
                domain=row["domain"],
                attempts=row["attempts"],
                queued_at=row["queued_at"],
                lease_expires_at=row["lease_expires_at"],
                message_class=MessageClass(row["class"]),
                list_id=row["list_id"],
            )
            for row in rows
        ]

    async def record_outcomes(self, owner: str, outcomes: Sequence[Outcome], now: datetime) -> set[int]:
        """Finish attempts; returns the recipient ids that were still leased by `owner` and so recorded."""
        if not outcomes:
            return set()
        rows = await self._pool.fetch(
            self._sql["record_outcomes"],
            owner,
            [o.recipient_id for o in outcomes],
            [o.state.value for o in outcomes],
            [o.next_attempt_at for o in outcomes],
            [o.reply.code if o.reply else None for o in outcomes],
            [o.reply.enhanced if o.reply else None for o in outcomes],
            [o.reply.text if o.reply else None for o in outcomes],
            now,
            [o.site for o in outcomes],
            [o.mx_host for o in outcomes],
            [o.tls_version for o in outcomes],
            [o.duration_ms for o in outcomes],
            [o.category for o in outcomes],
            [o.hard for o in outcomes],
        )
        return {row["recipient_id"] for row in rows}

    async def complete(self, owner: str, recipient_ids: Iterable[int], reply: Reply, now: datetime) -> set[int]:
        return await self.record_outcomes(
            owner, [Outcome(rid, RecipientState.DELIVERED, reply) for rid in recipient_ids], now
        )

    async def defer(
        self, owner: str, recipient_ids: Iterable[int], reply: Reply, retry_at: datetime, now: datetime
    ) -> set[int]:
        return await self.record_outcomes(
            owner, [Outcome(rid, RecipientState.DEFERRED, reply, retry_at) for rid in recipient_ids], now
        )

    async def bounce(self, owner: str, recipient_ids: Iterable[int], reply: Reply, now: datetime) -> set[int]:
        return await self.record_outcomes(
            owner, [Outcome(rid, RecipientState.BOUNCED, reply) for rid in recipient_ids], now
        )

    async def release(
        self, owner: str, recipient_ids: Iterable[int], now: datetime, not_before: datetime | None = None
    ) -> set[int]:
        """Give leases back without counting an attempt (due again at `not_before` if given); returns the ids."""
        rows = await self._pool.fetch(self._sql["release"], list(recipient_ids), owner, now, not_before)
        return {row["recipient_id"] for row in rows}

    async def postpone(self, owner: str, turns: Sequence[tuple[int, datetime]], now: datetime) -> None:
        """Give leases back without an attempt, each recipient due again at its own time."""
        await self._pool.execute(
            self._sql["postpone"], owner, now, [recipient_id for recipient_id, _ in turns], [at for _, at in turns]
        )

    async def release_owner(self, owner: str, now: datetime) -> int:
        """Give back every lease `owner` still holds (a clean stop); returns how many."""
        return len(await self._pool.fetch(self._sql["release_owner"], owner, now))

    async def extend_leases(self, owner: str, recipient_ids: Iterable[int], now: datetime, lease_s: float) -> None:
        await self._pool.execute(self._sql["extend_leases"], list(recipient_ids), owner, now, float(lease_s))

    async def reclaim_expired(self, now: datetime, limit: int = 10_000) -> int:
        """Return recipients whose lease ran out to the queue, due now; returns how many."""
        rows = await self._pool.fetch(self._sql["reclaim_expired"], now, limit)
        return len(rows)

    async def publish_site_status(self, node: str, sites: Sequence, now: datetime) -> None:
        """This node's view of its sites (schedule.engine.SiteState with wall-clock dead_until)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if sites:
                await conn.execute(
                    self._sql["upsert_site_status"],
                    node,
                    now,
                    [s.site for s in sites],
                    [s.provider for s in sites],
                    [s.health for s in sites],
                    [s.concurrency for s in sites],
                    [s.in_flight for s in sites],
                    [s.pending for s in sites],
                    [s.rate_scale for s in sites],
                    [s.dead_until for s in sites],
                    [s.last_error for s in sites],
                )
            await conn.execute(self._sql["forget_site_status"], node, now, now - timedelta(hours=1))

    async def load_message(self, message_id: int) -> StoredMessage | None:
        row = await self._pool.fetchrow(self._sql["load_message"], message_id)
        return None if row is None else _stored_message(row)

    async def load_messages(self, message_ids: Sequence[int]) -> list[StoredMessage]:
        return [_stored_message(row) for row in await self._pool.fetch(self._sql["load_messages"], list(message_ids))]


def _stored_message(row) -> StoredMessage:
    fields = dict(row)
    return StoredMessage(message_class=MessageClass(fields.pop("class")), list_id=fields.pop("list_id"), **fields)

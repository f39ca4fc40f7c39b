"""Queueing mail straight into the store, for delivery tests (the submission path has its own tests)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from mtad.model import EnvelopeRecipient, Submission
from mtad.policy.queue_id import make_queue_id
from mtad.queue.store import QueueStore

_ids = iter(range(1, 10**9))


async def queue_messages(pool, domain_recipients: list[list[str]], body: bytes | None = None) -> None:
    """Queue messages straight into the store (the submission path has its own tests)."""
    store = QueueStore(pool)
    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    now = datetime.now(timezone.utc)
    for recipients in domain_recipients:
        await store.insert_submission(
            Submission(
                queue_id=make_queue_id(int(time.time() * 1000), next(_ids)),
                tenant_id=tenant_id,
                mail_from="news@acme.example",
                recipients=tuple(EnvelopeRecipient(r, r.split("@")[1]) for r in recipients),
                body=body or b"From: news@acme.example\r\nSubject: test\r\n\r\nhello\r\n",
                client_ip="127.0.0.0",
                received_at=now,
            )
        )

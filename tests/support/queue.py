"""Queueing mail straight into the store, for delivery tests (the submission path has its own tests)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from mtad.model import EnvelopeRecipient, Submission
from mtad.policy.queue_id import make_queue_id
from mtad.queue.store import QueueStore

_ids = iter(range(1, 10**9))


async def queue_messages(
    pool, domain_recipients: list[list[str]], body: bytes | None = None, tenant: str = "acme", list_id: str = ""
) -> list[str]:
    """Queue messages (one per list of recipients) of `tenant` (sender news@TENANT.example) straight into the
    store (the submission path has its own tests); returns their queue ids."""
    store = QueueStore(pool)
    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    now = datetime.now(timezone.utc)
    queue_ids = []
    for recipients in domain_recipients:
        queue_ids.append(make_queue_id(int(time.time() * 1000), next(_ids)))
        await store.insert_submission(
            Submission(
                queue_id=queue_ids[-1],
                tenant_id=tenant_id,
                mail_from=f"news@{tenant}.example",
                recipients=tuple(EnvelopeRecipient(r, r.split("@")[1]) for r in recipients),
                body=body or f"From: news@{tenant}.example\r\nSubject: test\r\n\r\nhello\r\n".encode(),
                client_ip="127.0.0.0",
                received_at=now,
                list_id=list_id,
            )
        )
    return queue_ids

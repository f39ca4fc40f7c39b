"""From a remote reply to a recipient's next state (RFC 5321 reply classes).

2xx -> delivered; 5xx -> bounced; 4xx -> deferred with the Postfix retry schedule, or expired once the
recipient is older than the queue lifetime. The caller passes `random_unit` so the jitter is testable.
"""

from __future__ import annotations

from datetime import datetime

from mtad.model import Claim, RecipientState, Reply
from mtad.policy.retry import is_expired, next_attempt_at


def next_state(
    claim: Claim,
    reply: Reply,
    now: datetime,
    *,
    minimal_backoff_s: float,
    maximal_backoff_s: float,
    queue_lifetime_s: float,
    jitter_fraction: float,
    random_unit: float,
) -> tuple[RecipientState, datetime | None]:
    if 200 <= reply.code < 300:
        return RecipientState.DELIVERED, None
    if reply.code >= 500:
        return RecipientState.BOUNCED, None
    if is_expired(claim.queued_at, now, queue_lifetime_s):
        return RecipientState.EXPIRED, None
    retry_at = next_attempt_at(
        claim.queued_at,
        now,
        minimal_backoff_s=minimal_backoff_s,
        maximal_backoff_s=maximal_backoff_s,
        jitter_fraction=jitter_fraction,
        random_unit=random_unit,
    )
    return RecipientState.DEFERRED, retry_at

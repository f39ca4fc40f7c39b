"""From a remote reply to a recipient's next state (RFC 5321 reply classes).

2xx -> delivered; 5xx -> bounced; 4xx -> deferred with the Postfix retry schedule, or expired once the
recipient is older than the queue lifetime. The caller passes `random_unit` so the jitter is testable.
"""

from __future__ import annotations

import re
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


_LEADING_REPLY = re.compile(r"^([245]\d\d)(?:[ -]([245]\.\d{1,3}\.\d{1,3}))?\s*(.*)$", re.DOTALL)


def unreachable_site_reply(error: str | None) -> Reply:
    """The deferral recorded for recipients of a site no session could be had with (connect, greeting,
    TLS failures; a dead site). The site's own words are kept: a temporary reply ("421 4.7.0 try later")
    with its codes; anything else, a permanent greeting included (it refuses the session, not these
    recipients), as 451 4.4.1 with the text, so no code appears twice in the recorded reason."""
    text = " ".join((error or "destination unreachable").split())[:300]
    match = _LEADING_REPLY.match(text)
    if match and match.group(1).startswith("4"):
        return Reply(int(match.group(1)), match.group(2) or "4.4.1", match.group(3) or text)
    return Reply(451, "4.4.1", text)

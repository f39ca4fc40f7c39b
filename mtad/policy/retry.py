"""When to try a deferred recipient again, and when to give up (Postfix qmgr_active.c).

delay = clamp(age, minimal_backoff, maximal_backoff): the longer a recipient has waited, the longer it waits
next time, exponential for free and a pure function of its age. A jitter of up to `jitter_fraction` spreads
retries of mail queued together. A recipient older than `maximal_queue_lifetime` expires instead.
"""

from __future__ import annotations

from datetime import datetime, timedelta


def retry_delay_s(age_s: float, minimal_backoff_s: float, maximal_backoff_s: float) -> float:
    return min(max(age_s, minimal_backoff_s), maximal_backoff_s)


def next_attempt_at(
    queued_at: datetime,
    now: datetime,
    *,
    minimal_backoff_s: float,
    maximal_backoff_s: float,
    jitter_fraction: float,
    random_unit: float,
) -> datetime:
    """`random_unit` in [0, 1) is passed in so the function stays pure and testable."""
    delay = retry_delay_s((now - queued_at).total_seconds(), minimal_backoff_s, maximal_backoff_s)
    return now + timedelta(seconds=delay * (1 + jitter_fraction * random_unit))


def is_expired(queued_at: datetime, now: datetime, lifetime_s: float) -> bool:
    return (now - queued_at).total_seconds() >= lifetime_s

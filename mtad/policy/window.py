"""The destination window: how many deliveries may be in flight to one site (Postfix qmgr, SCHEDULER_README).

In:  feedback about sessions (success, session-level failure, throttling reply) with `now` in seconds.
Out: the concurrency allowed now and a rate scale for the site's message rate.
- Slow start at `initial_destination_concurrency`; positive feedback g(N) = 1/N per successful delivery,
  so the window grows by one per window-full of successes, up to `connection_limit`.
- Session-level failures (connect, greeting, TLS) are negative feedback: the window shrinks by one.
  A 550 for one recipient says nothing about the site's capacity and is no feedback at all.
- After `dead_after_failures` failed sessions in a row the site is DEAD until `dead_for_s` has passed, then
  one probe session is allowed; one more failure kills it again.
- A throttling reply (421, "rate limited", ...) puts the site in BACKOFF: window halved, message rate
  halved (down to `backoff_min_rate_scale`), no growth until `backoff_for_s` without another throttle;
  then the rate doubles back every `backoff_for_s` until it is whole (PowerMTA's backoff mode).
The state is an explicit enum next to the window (Postfix's authors regret encoding it in the integer).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mtad.policy.shaping import ShapeLimits


class SiteHealth(StrEnum):
    HEALTHY = "healthy"
    BACKOFF = "backoff"
    DEAD = "dead"


@dataclass
class DestinationWindow:
    limits: ShapeLimits
    window: float = 0.0
    health: SiteHealth = SiteHealth.HEALTHY
    failed_in_a_row: int = 0
    dead_until: float = 0.0
    backoff_until: float = 0.0
    rate_scale: float = 1.0
    last_error: str | None = None

    def __post_init__(self) -> None:
        if self.window <= 0:
            self.window = float(min(self.limits.initial_destination_concurrency, self.limits.connection_limit))

    def concurrency(self, now: float) -> int:
        self._advance(now)
        if self.health is SiteHealth.DEAD:
            return 0
        return max(1, min(int(self.window), self.limits.connection_limit))

    def on_success(self, now: float) -> None:
        self._advance(now)
        self.failed_in_a_row = 0
        if self.health is SiteHealth.BACKOFF and now < self.backoff_until:
            return  # no growth while the remote side is still telling us to slow down
        self.window = min(float(self.limits.connection_limit), self.window + 1.0 / self.window)

    def on_session_failure(self, now: float, error: str) -> None:
        self._advance(now)
        self.last_error = error
        self.failed_in_a_row += 1
        self.window = max(1.0, self.window - 1.0)
        if self.failed_in_a_row >= self.limits.dead_after_failures:
            self.health = SiteHealth.DEAD
            self.dead_until = now + self.limits.dead_for_s
            self.failed_in_a_row = self.limits.dead_after_failures - 1  # the probe after it gets one chance

    def on_throttled(self, now: float, error: str) -> None:
        self._advance(now)
        self.last_error = error
        self.health = SiteHealth.BACKOFF
        self.window = max(1.0, self.window / 2)
        self.rate_scale = max(self.limits.backoff_min_rate_scale, self.rate_scale / 2)
        self.backoff_until = now + self.limits.backoff_for_s

    def _advance(self, now: float) -> None:
        if self.health is SiteHealth.DEAD and now >= self.dead_until:
            self.health = SiteHealth.HEALTHY
            self.window = 1.0
        while self.health is SiteHealth.BACKOFF and now >= self.backoff_until:
            self.rate_scale = min(1.0, self.rate_scale * 2)
            if self.rate_scale >= 1.0:
                self.health = SiteHealth.HEALTHY
                break
            self.backoff_until += self.limits.backoff_for_s

    def wakeup_at(self) -> float | None:
        """When this site's state changes by itself (dead -> probe, backoff -> faster)."""
        if self.health is SiteHealth.DEAD:
            return self.dead_until
        if self.health is SiteHealth.BACKOFF:
            return self.backoff_until
        return None

"""Token buckets for `max_message_rate` and `max_connection_rate` ("100/s", "20000/h").

In:  a rate (tokens per second), a burst size, and `now` in seconds.
Out: whether a token can be taken now, and when the next one will be there.
A bucket starts full: a site that has been quiet may send a short burst, never more than `burst`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|m|min|h|hour|d|day)\s*$")
_EPSILON = 1e-9
_PER_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(text: str) -> float:
    """Tokens per second from "100/s", "300/m", "20000/h", "500000/d"."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f'expected a rate like "100/s" or "20000/h", got {text!r}')
    return float(match.group(1)) / _PER_S[match.group(2)]


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0  # -1: start full
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def try_take(self, now: float, scale: float = 1.0) -> bool:
        """Take one token; `scale` < 1 slows the effective rate (backoff) without touching the config."""
        self._refill_scaled(now, scale)
        if self.tokens >= 1.0 - _EPSILON:  # sums of float increments fall a hair short of whole tokens
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def seconds_until_token(self, now: float, scale: float = 1.0) -> float:
        self._refill_scaled(now, scale)
        missing = 1.0 - _EPSILON - self.tokens
        return 0.0 if missing <= 0 else missing / (self.rate_per_s * scale)

    def _refill_scaled(self, now: float, scale: float) -> None:
        if now > self.updated_at:
            self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate_per_s * scale)
            self.updated_at = now

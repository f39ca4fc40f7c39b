"""Failed-login limiting per client address (a sliding window), against password guessing.

In:  failures and successes per client key, with `now` passed in.
Out: `is_blocked(key, now)`: true once `max_failures` failures fell inside the last `window_s` seconds.
Invariant: memory is bounded: at most `max_clients` keys are tracked, the stalest evicted first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class LoginThrottle:
    max_failures: int
    window_s: float
    max_clients: int = 100_000
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def is_blocked(self, client: str, now: float) -> bool:
        failures = self._failures.get(client)
        if not failures:
            return False
        self._forget_old(failures, now)
        return len(failures) >= self.max_failures

    def record_failure(self, client: str, now: float) -> None:
        failures = self._failures.pop(client, None) or deque(maxlen=self.max_failures)
        self._forget_old(failures, now)
        failures.append(now)
        self._failures[client] = failures
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def record_success(self, client: str) -> None:
        self._failures.pop(client, None)

    def _forget_old(self, failures: deque[float], now: float) -> None:
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()

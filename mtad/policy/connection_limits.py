"""How many SMTP connections one client address, and everyone together, may hold open.

In:  connect / disconnect of a client address. Out: None (admit) or the 421 reply to close with.
Bounds memory and file descriptors under a flood of connections; per-client so one misbehaving
application cannot lock out the others.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ConnectionLimits:
    max_total: int
    max_per_client: int
    _open: Counter[str] = field(default_factory=Counter)

    def admit(self, client: str) -> str | None:
        if sum(self._open.values()) >= self.max_total:
            return "421 4.3.2 Too many connections; try again later"
        if self._open[client] >= self.max_per_client:
            return "421 4.7.0 Too many connections from your address; try again later"
        self._open[client] += 1
        return None

    def release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


def over_queue_limit(pending_recipients: int, max_pending: int) -> str | None:
    """Back-pressure: past the configured queue size new mail waits at the client, not in memory or disk."""
    if max_pending and pending_recipients >= max_pending:
        return "452 4.3.1 Queue is full; try again later"
    return None

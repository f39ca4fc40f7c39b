"""Suppressions that arrived after recipients were leased: the last guard before an attempt.

The claim query already skips suppressed recipients; this covers the copies a node leased just before the
unsubscribe (told by NOTIFY `mtad_suppressed`). Entries live as long as a lease can, then are forgotten;
memory is bounded by `max_entries`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from mtad.model import Claim, MessageClass


@dataclass
class RecentSuppressions:
    ttl_s: float
    max_entries: int = 100_000
    _entries: OrderedDict[tuple[int, str], tuple[str, float]] = field(default_factory=OrderedDict)

    def add(self, payload: str, now: float) -> None:
        """Payload of NOTIFY mtad_suppressed: "<tenant_id> <reason> <address>"."""
        parts = payload.split(" ", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            return
        key = (int(parts[0]), parts[2].lower())
        self._entries.pop(key, None)
        self._entries[key] = (parts[1], now + self.ttl_s)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def blocks(self, claim: Claim, now: float) -> bool:
        entry = self._entries.get((claim.tenant_id, claim.address.lower()))
        if entry is None:
            return False
        reason, expires = entry
        if expires < now:
            del self._entries[(claim.tenant_id, claim.address.lower())]
            return False
        return reason != "unsubscribed" or claim.message_class is MessageClass.MARKETING

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
    _entries: OrderedDict[tuple[int, str, str], tuple[str, float]] = field(default_factory=OrderedDict)

    def add(self, payload: str, now: float) -> None:
        """Payload of NOTIFY mtad_suppressed: "<tenant_id> <reason> <list or *> <address>"."""
        parts = payload.split(" ", 3)
        if len(parts) != 4 or not parts[0].isdigit():
            return
        key = (int(parts[0]), parts[3].lower(), parts[2])
        self._entries.pop(key, None)
        self._entries[key] = (parts[1], now + self.ttl_s)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def blocks(self, claim: Claim, now: float) -> bool:
        address = claim.address.lower()
        for list_scope in ("*", claim.list_id):
            key = (claim.tenant_id, address, list_scope)
            entry = self._entries.get(key)
            if entry is None:
                continue
            reason, expires = entry
            if expires < now:
                del self._entries[key]
                continue
            if reason != "unsubscribed" or claim.message_class is MessageClass.MARKETING:
                return True
        return False

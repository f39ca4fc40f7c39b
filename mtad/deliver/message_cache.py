"""Stored messages for delivery: loaded once from PostgreSQL, kept while recipients of theirs are held.

The messages of a claimed batch are loaded together (`prefetch`: one round trip per batch instead of one
per message) and counted as held by their claimed recipients; `release` says a recipient left the node
(delivered, bounced, deferred, handed back). Memory is bounded in bytes: messages nobody holds any more go
first (oldest first), so a large backlog of held mail is never pushed out by mail already sent; recipients
of one message in several transactions (several sites, retries, one copy per recipient) share one load.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

from mtad.queue.store import QueueStore, StoredMessage


class MessageCache:
    def __init__(self, store: QueueStore, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._bytes = 0
        self._holds: Counter[int] = Counter()  # message id -> recipients held by this node
        self._held: OrderedDict[int, StoredMessage] = OrderedDict()  # loaded, some recipient still held
        self._unheld: OrderedDict[int, StoredMessage] = OrderedDict()  # loaded, evicted first

    async def get(self, message_id: int) -> StoredMessage | None:
        stored = self._held.get(message_id) or self._unheld.get(message_id)
        if stored is None:
            stored = await self._store.load_message(message_id)
            if stored is not None:
                self._keep(stored)
        return stored

    async def prefetch(self, message_ids: Iterable[int]) -> None:
        """Recipients of these messages were claimed (one id per recipient): hold them, load what is missing."""
        claimed = Counter(message_ids)
        self._holds.update(claimed)
        for message_id in claimed:
            stored = self._unheld.pop(message_id, None)
            if stored is not None:
                self._held[message_id] = stored
        missing = [message_id for message_id in claimed if message_id not in self._held]
        if missing:
            for stored in await self._store.load_messages(missing):
                self._keep(stored)

    def release(self, message_id: int, recipients: int = 1) -> None:
        if recipients <= 0:
            return
        left = self._holds[message_id] - recipients
        if left > 0:
            self._holds[message_id] = left
            return
        del self._holds[message_id]
        stored = self._held.pop(message_id, None)
        if stored is not None:
            self._unheld[message_id] = stored

    def _keep(self, stored: StoredMessage) -> None:
        if stored.id in self._held or stored.id in self._unheld:
            return
        (self._held if self._holds[stored.id] > 0 else self._unheld)[stored.id] = stored
        self._bytes += len(stored.body)
        while self._bytes > self._max_bytes and len(self._held) + len(self._unheld) > 1:
            _, evicted = (self._unheld or self._held).popitem(last=False)
            self._bytes -= len(evicted.body)

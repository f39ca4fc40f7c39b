"""Stored messages for delivery: loaded once from PostgreSQL, kept in an LRU bounded in bytes.

Recipients of one message delivered in several transactions (several sites, retries, one copy per
recipient) share one load; a backlog of large messages cannot exhaust memory. The messages of a claimed
batch are loaded together (`prefetch`): one round trip per batch instead of one per message.
"""

from __future__ import annotations

from collections import OrderedDict

from mtad.queue.store import QueueStore, StoredMessage


class MessageCache:
    def __init__(self, store: QueueStore, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[int, StoredMessage] = OrderedDict()

    async def get(self, message_id: int) -> StoredMessage | None:
        stored = self._entries.get(message_id)
        if stored is not None:
            self._entries.move_to_end(message_id)
            return stored
        stored = await self._store.load_message(message_id)
        if stored is not None:
            self._keep(stored)
        return stored

    async def prefetch(self, message_ids: set[int]) -> None:
        missing = [message_id for message_id in message_ids if message_id not in self._entries]
        if missing:
            for stored in await self._store.load_messages(missing):
                self._keep(stored)

    def _keep(self, stored: StoredMessage) -> None:
        if stored.id in self._entries:
            return
        self._entries[stored.id] = stored
        self._bytes += len(stored.body)
        while self._bytes > self._max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.body)

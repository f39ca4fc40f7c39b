"""The delivery message cache: held messages stay, sent ones go first, batches load in one round trip."""

from __future__ import annotations

from mtad.deliver.message_cache import MessageCache
from mtad.model import MessageClass
from mtad.queue.store import StoredMessage


class CountingStore:
    """Stands in for PostgreSQL (tested against the real one in tests/integration): counts round trips."""

    def __init__(self) -> None:
        self.round_trips = 0

    def _message(self, message_id: int) -> StoredMessage:
        return StoredMessage(message_id, f"Q{message_id}", 1, "a@b.example", False, b"x" * 1000,
                             MessageClass.MARKETING, "")

    async def load_message(self, message_id: int) -> StoredMessage:
        self.round_trips += 1
        return self._message(message_id)

    async def load_messages(self, message_ids: list[int]) -> list[StoredMessage]:
        self.round_trips += 1
        return [self._message(m) for m in message_ids]


async def test_a_claimed_batch_loads_in_one_round_trip_and_is_served_from_memory():
    store = CountingStore()
    cache = MessageCache(store)
    await cache.prefetch([1, 2, 2, 3])
    assert [(await cache.get(m)).queue_id for m in (1, 2, 3)] == ["Q1", "Q2", "Q3"]
    assert store.round_trips == 1


async def test_messages_still_held_are_kept_and_sent_ones_are_evicted_first():
    store = CountingStore()
    cache = MessageCache(store, max_bytes=3500)  # room for three 1,000-byte messages
    await cache.prefetch([1, 2, 3])
    await cache.get(1)
    cache.release(1)  # sent: message 1 is no longer needed here
    await cache.prefetch([4])  # over the budget: 1 goes, not the held 2 or 3
    loads = store.round_trips
    for held in (2, 3, 4):
        await cache.get(held)
    assert store.round_trips == loads
    await cache.get(1)
    assert store.round_trips == loads + 1


async def test_a_message_stays_held_until_its_last_recipient_is_released():
    store = CountingStore()
    cache = MessageCache(store, max_bytes=2500)  # room for two
    await cache.prefetch([1, 1, 2])
    cache.release(2)  # message 2 done; message 1 has one of its two recipients done
    cache.release(1)
    await cache.prefetch([3])  # over budget: the unheld 2 goes, the half-done 1 stays
    loads = store.round_trips
    await cache.get(1)
    assert store.round_trips == loads
    await cache.get(2)
    assert store.round_trips == loads + 1

"""The claimer: waits until recipients are due, then leases a batch for delivery.

It claims at most what the caller has room for (the bounded active set), wakes on NOTIFY and falls back to
polling, so a lost notification delays work by one poll interval at most.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from mtad.model import Claim
from mtad.queue.store import QueueStore
from mtad.queue.wakeup import QueueWakeup


class Claimer:
    def __init__(
        self,
        store: QueueStore,
        wakeup: QueueWakeup,
        *,
        owner: str,
        batch_size: int,
        lease_s: float,
        poll_interval_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._wakeup = wakeup
        self.owner = owner
        self._batch_size = batch_size
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock

    async def next_batch(self, capacity: int) -> list[Claim]:
        """Block until at least one recipient is claimed; never more than `capacity`."""
        limit = max(1, min(capacity, self._batch_size))
        while True:
            claims = await self._store.claim(self.owner, limit, self._lease_s, self._clock())
            if claims:
                return claims
            await self._wakeup.wait(self._poll_interval_s)

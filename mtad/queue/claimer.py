"""The claimer: waits until recipients are due, then leases a batch for delivery.

It claims at most what the caller has room for (the bounded active set), wakes on NOTIFY and falls back to
polling, so a lost notification delays work by one poll interval at most.

After a batch that took everything due (fewer than asked), the next claim waits `PARTIAL_BATCH_GAP_S`:
under a steady stream of submissions, claiming again at once leased the one or two recipients that had
arrived meanwhile, a claim and a message load per delivery; PostgreSQL then spent more on those small
statements than on storing the mail. 20 ms of added latency lets the next batch fill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

from mtad.model import Claim
from mtad.queue.store import QueueStore
from mtad.queue.wakeup import QueueWakeup

PARTIAL_BATCH_GAP_S = 0.02


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
        self._next_claim_at = 0.0  # time.monotonic()

    async def next_batch(self, capacity: int) -> list[Claim]:
        """Block until at least one recipient is claimed; never more than `capacity`."""
        limit = max(1, min(capacity, self._batch_size))
        while True:
            gap = self._next_claim_at - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            claims = await self._store.claim(self.owner, limit, self._lease_s, self._clock())
            if len(claims) < limit:
                self._next_claim_at = time.monotonic() + PARTIAL_BATCH_GAP_S
            if claims:
                return claims
            await self._wakeup.wait(self._poll_interval_s)

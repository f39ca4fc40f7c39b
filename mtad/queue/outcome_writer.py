"""Outcome writes batched across concurrent deliveries: one statement (one commit) per flush.

Each delivery awaits its own outcomes being committed, so "recorded before anything else happens to that
recipient" holds; concurrent deliveries share a commit (and its fsync). If PostgreSQL is unavailable the
batch is retried until it is written: the remote side already has the message, forgetting it would mean
sending it twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.observe.logs import log_event
from mtad.queue.store import Outcome, QueueStore

log = logging.getLogger("mtad.queue.outcomes")
MAX_BATCH = 1000
# Short, so outcomes held through an outage are written soon after PostgreSQL is back: a lease that runs
# out first is reclaimed and its recipient attempted again.
MAX_RETRY_S = 1.0


class OutcomeWriter:
    def __init__(self, store: QueueStore, owner: str, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._owner = owner
        self._clock = clock
        self._waiting: list[tuple[Sequence[Outcome], asyncio.Future[set[int]]]] = []
        self._kick = asyncio.Event()
        self._writing = False

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every outcome handed in so far is written (before a stop cancels `run`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._waiting or self._writing) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not (self._waiting or self._writing)

    async def record(self, outcomes: Sequence[Outcome]) -> set[int]:
        """Returns the recipient ids recorded (those still leased by this node)."""
        if not outcomes:
            return set()
        future: asyncio.Future[set[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((outcomes, future))
        self._kick.set()
        return await future

    async def run(self) -> None:
        retry_s = 0.1
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._waiting:
                batch, size = [], 0
                while self._waiting and size < MAX_BATCH:
                    outcomes, future = self._waiting.pop(0)
                    batch.append((outcomes, future))
                    size += len(outcomes)
                self._writing = True
                try:
                    recorded = await self._store.record_outcomes(
                        self._owner, [o for outcomes, _ in batch for o in outcomes], self._clock()
                    )
                except DATABASE_UNAVAILABLE as exc:
                    log_event(log, "outcomes.write_failed", logging.WARNING, error=type(exc).__name__, retry_s=retry_s)
                    self._waiting[:0] = batch
                    self._writing = False
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, MAX_RETRY_S)
                    continue
                except Exception as exc:
                    # Not the database being away but a bug: fail these deliveries (their leases expire and
                    # are reclaimed) rather than end this loop, which would leave every later delivery
                    # waiting forever while the daemon looks alive.
                    log.exception("recording outcomes failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    self._writing = False
                    continue
                self._writing = False
                retry_s = 0.1
                for outcomes, future in batch:
                    if not future.done():
                        future.set_result({o.recipient_id for o in outcomes} & recorded)

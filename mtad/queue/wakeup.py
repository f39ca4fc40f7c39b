"""LISTEN as a hint: one dedicated connection listens on `mtad_queue` and sets an asyncio.Event.

After procrastinate's worker and pgqueuer's driver: the claimer waits on the event *or* its poll interval,
so nothing depends on a NOTIFY arriving. A lost connection is re-opened with capped backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from mtad.db.pool import DATABASE_UNAVAILABLE

CHANNEL = "mtad_queue"
SUPPRESSED_CHANNEL = "mtad_suppressed"  # "<tenant_id> <reason> <address>": drop leased copies at once
log = logging.getLogger("mtad.queue.wakeup")


class QueueWakeup:
    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        on_suppressed: Callable[[str], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_suppressed = on_suppressed
        self._event = asyncio.Event()
        self.listening = False

    def notify(self) -> None:
        """Wake the waiter from inside the process (e.g. an operator retry)."""
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True if woken by a notification, False when the poll interval ran out."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._event.clear()

    async def run(self) -> None:
        backoff_s = 0.5
        while True:
            lost = asyncio.Event()
            conn = None
            try:
                conn = await self._connect()
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(CHANNEL, lambda *_args: self._event.set())
                if self._on_suppressed is not None:
                    on_suppressed = self._on_suppressed
                    await conn.add_listener(SUPPRESSED_CHANNEL, lambda _c, _p, _ch, payload: on_suppressed(payload))
                self.listening = True
                backoff_s = 0.5
                self._event.set()  # anything queued while we were not listening is due now
                await lost.wait()
                log.warning("queue listener connection lost; reconnecting")
            except DATABASE_UNAVAILABLE as exc:
                log.warning("queue listener cannot connect: %s", type(exc).__name__)
            finally:
                self.listening = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 10.0)


class ArrivalSignal:
    """Mail was queued: wake this process's claimer at once, and other nodes' by a NOTIFY sent outside the
    submission's transaction, at most once per `min_interval_s` (a hint only: they poll as well)."""

    def __init__(self, pool: asyncpg.Pool, local: QueueWakeup | None, min_interval_s: float = 0.05) -> None:
        self._pool = pool
        self._local = local
        self._min_interval_s = min_interval_s
        self._sending: asyncio.Task | None = None
        self._again = False

    def queued(self) -> None:
        if self._local is not None:
            self._local.notify()
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())
        else:
            self._again = True

    async def _send(self) -> None:
        while True:
            self._again = False
            try:
                await self._pool.execute("SELECT pg_notify($1, '')", CHANNEL)
            except DATABASE_UNAVAILABLE:
                pass  # other nodes find the mail by polling
            await asyncio.sleep(self._min_interval_s)
            if not self._again:
                return

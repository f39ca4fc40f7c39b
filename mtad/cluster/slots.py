"""Cluster-wide connection limits: an open outbound connection holds one of its site's slots in PostgreSQL.

`connection_limit` in shaping.toml is a limit for the whole cluster (KumoMTA's shared connection leases,
kept in PostgreSQL instead of Redis): before opening a connection a node takes a free slot numbered below
the limit; closing gives it back; the heartbeat renews the node's slots, so a node that dies holds them for
at most `cluster.dead_after` (its TCP connections died with it). A node that finds every slot taken asks the
others to give back idle connections to that site (`connection_slot_wants`) and caps itself meanwhile.
Costs one statement per connection opened and one per connection closed, none per message.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from mtad.cluster.store import ClusterStore
from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.observe.logs import log_event

log = logging.getLogger("mtad.cluster")

_RACE_RETRIES = 3  # two takers picked the same free slot: the loser looks again (not when none was free)
_WANT_EVERY_S = 1.0


class ConnectionSlots:
    def __init__(self, store: ClusterStore, node: str, ttl_s: float) -> None:
        self._store = store
        self._node = node
        self._ttl = timedelta(seconds=ttl_s)
        self._wanted_at: dict[str, float] = {}
        self.held: set[tuple[str, int]] = set()

    async def take(self, site: str, limit: int) -> int | None:
        """A slot of `site`, or None when all `limit` are held (or the database cannot say)."""
        try:
            for _ in range(_RACE_RETRIES):
                slot, free = await self._store.take_slot(site, self._node, limit, self._ttl)
                if slot is not None:
                    self.held.add((site, slot))
                    return slot
                if not free:
                    break
            await self._want(site)
        except DATABASE_UNAVAILABLE as exc:
            log_event(log, "cluster.slot_unavailable", logging.WARNING, site=site, error=type(exc).__name__)
        return None

    async def give(self, site: str, slot: int) -> None:
        self.held.discard((site, slot))
        try:
            await self._store.give_slots(self._node, [(site, slot)])
        except DATABASE_UNAVAILABLE:
            pass  # it lapses after the ttl, since the heartbeat no longer renews a slot we do not hold

    async def _want(self, site: str) -> None:
        now = time.monotonic()
        if now - self._wanted_at.get(site, -_WANT_EVERY_S) >= _WANT_EVERY_S:
            self._wanted_at[site] = now
            await self._store.want_slot(site, self._node)

"""Pooled outbound connections, keyed by (site, MX hosts, TLS mode).

A connection carries up to `max_deliveries_per_connection` messages and is closed after `idle_timeout`
unused. New connections to a site are paced by its `max_connection_rate`. Idle connections beyond what the
site's window allows are closed, so a site whose window shrank is not kept busy by our idle sessions.
With cluster-wide slots (mtad.cluster.slots) every open connection holds one of its site's slots; when other
nodes want slots of a site, this node keeps at most its fair share open and gives idle ones back.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import defaultdict

from mtad.cluster.slots import ConnectionSlots
from mtad.deliver.connection import OutboundConnection, Timeouts, open_connection
from mtad.model import Route
from mtad.observe.metrics import CONNECTIONS_OPEN, CONNECTIONS_OPENED
from mtad.policy.rate import TokenBucket
from mtad.policy.shaping import SiteShape


class NoConnectionSlot(Exception):
    """Every cluster-wide slot of the site is held (by this node or others): try again shortly."""


class ConnectionPool:
    def __init__(self, *, ehlo_name: str, timeouts: Timeouts, slots: ConnectionSlots | None = None) -> None:
        self._ehlo_name = ehlo_name
        self._timeouts = timeouts
        self._slots = slots
        self._verify_context = ssl.create_default_context()
        self._idle: dict[tuple, list[OutboundConnection]] = defaultdict(list)
        self._open_per_site: dict[str, int] = defaultdict(int)
        self._connection_rate: dict[str, TokenBucket] = {}
        self._slot_of: dict[int, int] = {}  # id(connection) -> its cluster slot
        self._fair_share: dict[str, int] = {}  # sites other nodes want slots of -> what this node may keep
        self.rate_share = 1.0  # this node's part of each site's max_connection_rate

    async def acquire(self, shape: SiteShape, route: Route) -> OutboundConnection:
        key = (shape.site, route.host_names, route.port, shape.limits.tls)
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.is_usable and now - conn.last_used < shape.limits.idle_timeout_s:
                return conn
            await self._close(shape.site, conn)
        slot = None
        if self._slots is not None:
            slot = await self._slots.take(shape.site, shape.limits.connection_limit)
            if slot is None:
                raise NoConnectionSlot(shape.site)
        try:
            await self._wait_for_connection_token(shape)
            conn = await open_connection(
                route,
                shape.limits,
                ehlo_name=self._ehlo_name,
                timeouts=self._timeouts,
                verify_context=self._verify_context,
            )
        except BaseException:
            if slot is not None:
                await self._slots.give(shape.site, slot)
            raise
        if slot is not None:
            self._slot_of[id(conn)] = slot
        conn.key = key
        conn.provider = shape.provider or "other"
        CONNECTIONS_OPENED.labels(conn.provider, conn.tls_version or "none").inc()
        CONNECTIONS_OPEN.labels(conn.provider).inc()
        self._open_per_site[shape.site] += 1
        return conn

    async def _wait_for_connection_token(self, shape: SiteShape) -> None:
        rate = shape.limits.max_connection_rate
        if not rate:
            return
        bucket = self._connection_rate.setdefault(shape.site, TokenBucket(rate, burst=max(1.0, rate * 0.1)))
        while not bucket.try_take(time.monotonic(), self.rate_share):
            await asyncio.sleep(bucket.seconds_until_token(time.monotonic(), self.rate_share))

    async def release(self, shape: SiteShape, conn: OutboundConnection, *, reusable: bool, max_open: int) -> None:
        conn.deliveries += 1
        conn.last_used = time.monotonic()
        conn.idle_timeout_s = shape.limits.idle_timeout_s
        if (
            not reusable
            or not conn.is_usable
            or conn.deliveries >= shape.limits.max_deliveries_per_connection
            or self._open_per_site[shape.site] > min(max_open, self._fair_share.get(shape.site, max_open))
        ):
            await self._close(shape.site, conn)
            return
        self._idle[conn.key].append(conn)

    async def _close(self, site: str, conn: OutboundConnection) -> None:
        self._open_per_site[site] -= 1
        CONNECTIONS_OPEN.labels(conn.provider).dec()
        await conn.close()
        slot = self._slot_of.pop(id(conn), None)
        if slot is not None:
            await self._slots.give(site, slot)

    async def share_with_other_nodes(self, wanted: dict[str, int]) -> None:
        """Other nodes wait for slots of these sites: keep at most the given number of connections open to
        each (closing idle ones now, busy ones when their transaction ends) until they stop asking."""
        self._fair_share = dict(wanted)
        surplus = []
        open_after = {site: self._open_per_site[site] for site in wanted}
        for key in list(self._idle):
            site, conns = key[0], self._idle[key]
            while conns and site in wanted and open_after[site] > wanted[site]:
                surplus.append((site, conns.pop()))
                open_after[site] -= 1
            if not conns:
                del self._idle[key]
        await self._close_detached(surplus)

    async def close_idle(self, now: float) -> None:
        """Close connections unused for longer than their site's idle timeout."""
        expired = []
        for key in list(self._idle):
            conns = self._idle[key]
            expired += [(key[0], conn) for conn in conns if now - conn.last_used >= conn.idle_timeout_s]
            conns[:] = [conn for conn in conns if now - conn.last_used < conn.idle_timeout_s]
            if not conns:
                del self._idle[key]
        await self._close_detached(expired)

    async def _close_detached(self, connections: list[tuple[str, OutboundConnection]]) -> None:
        # Taken out of the idle lists before the first await: acquire() can neither hand one of them out
        # while it is being closed nor see a list change under its feet.
        for site, conn in connections:
            await self._close(site, conn)

    async def close_all(self) -> None:
        every = [(key[0], conn) for key, conns in self._idle.items() for conn in conns]
        self._idle.clear()
        await self._close_detached(every)

"""This node in the cluster: registered in `nodes`, beating every `heartbeat_interval`, gone on a clean stop.

Each beat also carries what the node learns from the others, into the delivery runner:
- how many nodes are alive: each takes 1/N of every site's message and connection rate (equal shares; a
  node with nothing for a site leaves its share unused, the safe side of a provider's limit);
- which sites other nodes wait for connection slots of: give back idle connections down to a fair share;
- which sites throttled another node: back off here too (within one heartbeat).
Nothing here is needed to deliver: when the database is away the beat is skipped and the last view kept.

A node that died on this host (kill -9, OOM, a crash restarted by systemd) is reaped by a sibling as soon as
it has missed `_REAP_AFTER_BEATS` heartbeats and the process table confirms its pid is gone: its connection
slots are freed and its leased recipients return to the queue at once, instead of after `dead_after` and
the lease. Nodes of other hosts are never reaped this way (their pids mean nothing here): their slots lapse
and their leases expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol

from mtad.cluster.slots import ConnectionSlots
from mtad.cluster.store import ClusterStore
from mtad.config import ClusterSettings
from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.observe.logs import log_event
from mtad.observe.metrics import CLUSTER_NODES

log = logging.getLogger("mtad.cluster")

DEAD_NODES_LISTED_FOR = timedelta(days=1)
_FORGET_EVERY_BEATS = 30
_ANNOUNCE_EVERY_S = 1.0
_REAP_AFTER_BEATS = 3  # one row update per site and second is plenty: the others read once per beat


class ClusterAware(Protocol):
    """What the delivery runner takes from the cluster."""

    def live_nodes_changed(self, live: int) -> None: ...

    async def slots_wanted(self, sites: list[str], live: int) -> None: ...

    def throttled_elsewhere(self, site: str, error: str | None) -> None: ...


class Membership:
    def __init__(
        self,
        store: ClusterStore,
        node: str,
        settings: ClusterSettings,
        slots: ConnectionSlots,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.host = host or socket.gethostname()  # the machine, not the SMTP name several nodes may share
        self.settings = settings
        self.slots = slots
        self.live_nodes = 1
        self.runner: ClusterAware | None = None
        self._started_at = datetime.now(timezone.utc)
        self._throttles_seen_until: datetime | None = None
        self._announced_at: dict[str, float] = {}
        self._announcing: set[asyncio.Task] = set()
        self._beats = 0

    @property
    def _dead_after(self) -> timedelta:
        return timedelta(seconds=self.settings.dead_after)

    async def join(self) -> None:
        """The first beat, before delivery starts: the runner begins with the right share."""
        await self.beat()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.beat()
            except DATABASE_UNAVAILABLE as exc:
                log_event(log, "cluster.heartbeat_failed", logging.WARNING, error=type(exc).__name__)

    async def beat(self) -> None:
        beat = await self.store.beat(
            self.node, self.host, os.getpid(), self._started_at, self._dead_after, sorted(self.slots.held)
        )
        if beat.live_nodes != self.live_nodes or self._beats == 0:
            if self._beats:
                log_event(log, "cluster.membership_changed", live_nodes=beat.live_nodes, was=self.live_nodes)
            self.live_nodes = beat.live_nodes
            CLUSTER_NODES.set(beat.live_nodes)
            if self.runner is not None:
                self.runner.live_nodes_changed(beat.live_nodes)
        if self._throttles_seen_until is None:
            self._throttles_seen_until = beat.at
        self._beats += 1
        await self._reap_dead_siblings()
        if self.runner is None:
            return
        wanted = await self.store.slot_wants(self.node, timedelta(seconds=2 * self.settings.heartbeat_interval))
        await self.runner.slots_wanted(wanted, self.live_nodes)
        for throttle in await self.store.throttles_since(self.node, self._throttles_seen_until):
            self.runner.throttled_elsewhere(throttle.site, throttle.error)
            self._throttles_seen_until = max(self._throttles_seen_until, throttle.throttled_at)
        if self._beats % _FORGET_EVERY_BEATS == 0:
            await self.store.forget_dead_nodes(DEAD_NODES_LISTED_FOR, self._dead_after)

    async def _reap_dead_siblings(self) -> None:
        silent_for = timedelta(seconds=_REAP_AFTER_BEATS * self.settings.heartbeat_interval)
        for node, pid in await self.store.silent_nodes_on_host(self.host, self.node, silent_for):
            if process_exists(pid):
                continue  # silent but alive (stalled, or the pid was reused): leave it to dead_after
            reaped, released = await self.store.reap_node(node)
            if reaped:  # not when another sibling reaped it at the same moment
                log_event(log, "cluster.node_reaped", node=node, recipients_released=released)

    def announce_throttle(self, site: str, error: str | None) -> None:
        """This node was throttled by `site`: tell the others (in the background, at most once a second)."""
        now = time.monotonic()
        if now - self._announced_at.get(site, -_ANNOUNCE_EVERY_S) < _ANNOUNCE_EVERY_S:
            return
        self._announced_at[site] = now
        task = asyncio.create_task(self._announce(site, error))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, site: str, error: str | None) -> None:
        try:
            await self.store.throttled(site, self.node, (error or "")[:300])
        except DATABASE_UNAVAILABLE:
            pass  # the others find their own way to the throttle

    async def leave(self) -> None:
        try:
            await self.store.leave(self.node)
        except DATABASE_UNAVAILABLE:
            pass  # the row ages into "dead" and is forgotten after a day


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True

"""Cluster-wide connection slots against a real PostgreSQL: taking, giving back, lapsing, what a node that
finds every slot held costs the database; and a dead node reaped by two siblings at once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from mtad.cluster.slots import ConnectionSlots
from mtad.cluster.store import ClusterStore
from mtad.config import DatabaseSettings
from mtad.db.pool import create_pool


@pytest.fixture
async def pool(db_url):
    """A pool as the daemon makes it (its connection settings, so its plans)."""
    pool = await create_pool(db_url, DatabaseSettings(pool_min_size=1, pool_max_size=4))
    yield pool
    await pool.close()


class CountingStore(ClusterStore):
    """The real store; counts the take statements it runs."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.takes = 0

    async def take_slot(self, *args):
        self.takes += 1
        return await super().take_slot(*args)


async def test_slots_are_shared_up_to_the_limit_and_a_full_site_costs_one_statement(pool):
    first = ConnectionSlots(CountingStore(pool), "node-a", 60)
    second = ConnectionSlots(CountingStore(pool), "node-b", 60)
    assert await first.take("site", 2) == 0
    assert await second.take("site", 2) == 1
    first._store.takes = 0
    assert await first.take("site", 2) is None  # every slot held: no retry, one want recorded
    assert first._store.takes == 1
    assert await pool.fetchval("SELECT count(*) FROM connection_slot_wants WHERE node = 'node-a'") == 1
    await second.give("site", 1)
    assert await first.take("site", 2) == 1
    assert first.held == {("site", 0), ("site", 1)} and second.held == set()


async def test_a_lapsed_slot_of_a_dead_node_is_taken_over(pool):
    store = ClusterStore(pool)
    assert await store.take_slot("site", "dead-node", 1, timedelta(seconds=60)) == (0, True)
    await pool.execute("UPDATE connection_slots SET expires_at = now() - interval '1 second'")
    alive = ConnectionSlots(store, "alive-node", 60)
    assert await alive.take("site", 1) == 0
    assert await pool.fetchval("SELECT node FROM connection_slots WHERE site = 'site' AND slot = 0") == "alive-node"


async def test_a_dead_node_reaped_by_two_siblings_at_once_is_reaped_by_one(pool):
    store = ClusterStore(pool)
    await pool.execute("INSERT INTO nodes (id, host, pid, started_at, heartbeat_at) "
                       "VALUES ('dead', 'h', 1, now(), now() - interval '1 minute')")
    await store.take_slot("site", "dead", 2, timedelta(seconds=60))
    outcomes = await asyncio.gather(store.reap_node("dead"), store.reap_node("dead"))
    assert sorted(reaped for reaped, _ in outcomes) == [False, True]
    assert not await pool.fetchval("SELECT count(*) FROM nodes WHERE id = 'dead'")
    assert not await pool.fetchval("SELECT count(*) FROM connection_slots WHERE node = 'dead'")

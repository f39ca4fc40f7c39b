"""Three mtad nodes (processes) on one PostgreSQL: shared site limits, membership, take-over (issue 8).

The remote side is real: a DNS server and SMTP sinks on 127.0.0.x; the sink measures what a provider would
see: concurrent sessions and message arrival times.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour
from support.daemon import DaemonProcess, delivering_process_document, until, write_config, write_shaping
from support.queue import queue_messages

pytestmark = pytest.mark.slow

CLUSTER = {"heartbeat_interval": "500ms", "dead_after": "5s"}


@pytest.fixture
async def world():
    async with RemoteWorld(["mx-a", "mx-b"]) as world:
        world.add_domain("a.example", sink="mx-a")
        world.add_domain("b.example", sink="mx-b")
        yield world


def node_config(tmp_path, db_url, world, shaping, name: str, delivery: dict | None = None, **queue) -> DaemonProcess:
    document = delivering_process_document(
        db_url, tmp_path / name, world, shaping, queue={"poll_interval": "200ms", **queue}, **(delivery or {})
    )
    document["cluster"] = CLUSTER
    return DaemonProcess(write_config(tmp_path / f"{name}.toml", document))


async def start_nodes(nodes: list[DaemonProcess]) -> None:
    # In threads: DaemonProcess.start waits synchronously, and the sinks live on this test's event loop.
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))


def stop_nodes(nodes: list[DaemonProcess]) -> None:
    for node in nodes:
        node.kill()



async def all_final(pool, n: int) -> bool:
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'delivered') AS delivered, count(*) AS total FROM recipients"
    )
    return row["total"] == n and row["delivered"] == n


async def test_three_nodes_keep_a_sites_connection_limit_and_rate_for_the_whole_cluster(
    db_url, tenants, pool, world, tmp_path
):
    # connection_limit 4 and 30 messages/s for the site: without cluster-wide limits three nodes would open
    # up to 12 sessions and send 90/s.
    shaping = write_shaping(
        tmp_path / "shaping.toml",
        {"connection_limit": 4, "initial_destination_concurrency": 4, "max_message_rate": "30/s"},
    )
    sink = world.sinks["mx-a"]
    sink.behaviour = SinkBehaviour(stall_after_data_s=0.02)  # sessions overlap: concurrency is visible
    nodes = [node_config(tmp_path, db_url, world, shaping, f"node{k}") for k in range(3)]
    try:
        await start_nodes(nodes)
        assert await until(lambda: live_nodes_are(pool, 3), timeout_s=10)
        await queue_messages(pool, [[f"r{n}@a.example"] for n in range(360)])
        leaseholders: set[str] = set()

        async def done_noting_leaseholders() -> bool:
            leaseholders.update(
                r["lease_owner"]
                for r in await pool.fetch("SELECT DISTINCT lease_owner FROM recipients WHERE state = 'active'")
            )
            return await all_final(pool, 360)

        assert await until(done_noting_leaseholders, timeout_s=60, interval_s=0.05)
    finally:
        stop_nodes(nodes)
    received = Counter(rcpt for m in sink.messages for rcpt in m.rcpt_tos)
    assert len(received) == 360 and max(received.values()) == 1
    assert 2 <= sink.max_concurrent_sessions <= 4  # shared, and never above the cluster's limit
    assert len(leaseholders) == 3  # all three nodes took part: the limits were shared, not held by one
    arrivals = sorted(m.received_at for m in sink.messages)
    steady = arrivals[30:-30]  # past the buckets' initial burst, before the tail
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 27 <= rate <= 33, f"combined rate {rate:.1f}/s, limit 30/s"


async def live_nodes(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM nodes WHERE heartbeat_at > now() - interval '5 seconds'")


async def live_nodes_are(pool, n: int) -> bool:
    return await live_nodes(pool) == n


async def test_a_node_killed_mid_run_has_its_leased_mail_delivered_by_the_others(
    db_url, tenants, pool, world, tmp_path
):
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 6, "initial_destination_concurrency": 6})
    sink = world.sinks["mx-a"]
    sink.behaviour = SinkBehaviour(stall_after_data_s=0.02)
    # A long lease: the take-over must come from the siblings noticing the death, not from lease expiry.
    nodes = [node_config(tmp_path, db_url, world, shaping, f"node{k}", lease="5m") for k in range(3)]
    try:
        await start_nodes(nodes)
        assert await until(lambda: live_nodes_are(pool, 3), timeout_s=10)
        await queue_messages(pool, [[f"r{n}@a.example"] for n in range(600)])
        victim_id = await until(lambda: node_holding_leases(pool), timeout_s=20, interval_s=0.02)
        victim = next(node for node in nodes if f":{node.process.pid}:" in victim_id)
        victim.kill()
        killed_at = time.monotonic()
        assert await until(lambda: all_final(pool, 600), timeout_s=60)
        took_over_s = time.monotonic() - killed_at
    finally:
        stop_nodes(nodes)
    received = Counter(rcpt for m in sink.messages for rcpt in m.rcpt_tos)
    assert set(received) == {f"r{n}@a.example" for n in range(600)}  # nothing lost
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= 6  # at most the victim's attempts in flight: the site's whole limit
    assert took_over_s < 30  # reaped after a few missed heartbeats, not after the 5 minute lease
    reaped = [e for node in nodes if node is not victim for e in node.events() if e.get("event") == "cluster.node_reaped"]
    assert [e["node"] for e in reaped] == [victim_id]
    assert not await pool.fetchval("SELECT count(*) FROM nodes WHERE id = $1", victim_id)


async def node_holding_leases(pool) -> str | None:
    """A node that holds leased recipients while some mail has already been delivered: mid-run."""
    return await pool.fetchval(
        "SELECT lease_owner FROM recipients WHERE state = 'active' "
        "AND EXISTS (SELECT 1 FROM recipients WHERE state = 'delivered' LIMIT 1) "
        "GROUP BY lease_owner ORDER BY count(*) DESC LIMIT 1"
    )


async def test_a_stalled_node_loses_its_slots_and_leases_to_the_others(db_url, tenants, pool, world, tmp_path):
    # SIGSTOP: the process exists (no reaping), it just stops beating. Its connection slots lapse after
    # dead_after and its leases expire; the others deliver its mail.
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 4, "initial_destination_concurrency": 4})
    sink = world.sinks["mx-a"]
    sink.behaviour = SinkBehaviour(stall_after_data_s=0.02)
    nodes = [node_config(tmp_path, db_url, world, shaping, f"node{k}", lease="6s") for k in range(3)]
    stalled = None
    try:
        await start_nodes(nodes)
        assert await until(lambda: live_nodes_are(pool, 3), timeout_s=10)
        await queue_messages(pool, [[f"r{n}@a.example"] for n in range(400)])
        stalled_id = await until(lambda: node_holding_leases(pool), timeout_s=20, interval_s=0.02)
        stalled = next(node for node in nodes if f":{node.process.pid}:" in stalled_id)
        stalled.signal(signal.SIGSTOP)
        assert await until(lambda: all_final(pool, 400), timeout_s=60)
        assert await live_nodes(pool) == 2
    finally:
        if stalled is not None:
            stalled.signal(signal.SIGCONT)
        stop_nodes(nodes)
    received = Counter(rcpt for m in sink.messages for rcpt in m.rcpt_tos)
    assert set(received) == {f"r{n}@a.example" for n in range(400)}


async def test_a_throttle_met_by_one_node_slows_the_others(db_url, tenants, pool, world, tmp_path):
    shaping = write_shaping(
        tmp_path / "shaping.toml",
        {"connection_limit": 6, "initial_destination_concurrency": 6, "backoff_for": "30s"},
    )
    sink = world.sinks["mx-a"]
    # 421 after 20 messages on a connection: nodes that share the site's 6 slots close and reopen connections
    # (fair shares), and a connection must live long enough to meet its 421.
    sink.behaviour = SinkBehaviour(stall_after_data_s=0.02, reply_421_after_messages=20)
    # Small claims and plenty of mail: both nodes hold mail for the site while the 421s come.
    nodes = [
        node_config(tmp_path, db_url, world, shaping, f"node{k}", {"status_interval": "300ms"}, claim_batch_size=20)
        for k in range(2)
    ]
    try:
        await start_nodes(nodes)
        await queue_messages(pool, [[f"r{n}@a.example"] for n in range(600)])
        assert await until(lambda: told_of_the_others_throttle(nodes), timeout_s=30)
        # Every node that holds the site is backed off (a node that holds none yet starts backed off if its
        # mail comes within backoff_for: see the engine's unit test).
        assert await until(lambda: no_node_sends_at_full_speed(pool), timeout_s=15)
    finally:
        stop_nodes(nodes)


async def told_of_the_others_throttle(nodes: list[DaemonProcess]) -> bool:
    """A node heard that the other one was throttled (it logs delivery.throttled_elsewhere)."""
    return any(e.get("event") == "delivery.throttled_elsewhere" for node in nodes for e in node.events())


async def no_node_sends_at_full_speed(pool) -> bool:
    return await pool.fetchval(
        "SELECT count(*) FILTER (WHERE health = 'backoff') > 0 AND count(*) FILTER (WHERE health = 'healthy') = 0"
        " FROM site_status"
    )


def test_mtad_nodes_lists_live_and_dead_nodes(db_url, tmp_path):
    # dead after 30 minutes: the live node's heartbeat must not age out while three commands start up
    config = write_config(tmp_path / "ops.toml", {"database": {"url": db_url}, "cluster": {"dead_after": "30m"}})
    asyncio.run(_register(db_url))
    listing = subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), "nodes", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    nodes = {n["id"]: n for n in json.loads(listing.stdout)}
    assert nodes["mx1:100:aaaaaa"]["alive"] and not nodes["mx2:200:bbbbbb"]["alive"]
    assert nodes["mx1:100:aaaaaa"]["slots"] == 1
    text = subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), "nodes"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "1 alive, 1 dead (silent longer than 1800s)" in text
    top = subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), "top", "--json", "--interval", "0.1"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    shown = {n["node"]: n for n in json.loads(top.stdout)["nodes_registered"]}
    assert shown["mx1:100:aaaaaa"]["alive"] and shown["mx1:100:aaaaaa"]["slots"] == 1
    assert not shown["mx2:200:bbbbbb"]["alive"]


async def _register(db_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO nodes VALUES ('mx1:100:aaaaaa', 'mx1', 100, now(), now()),"
            " ('mx2:200:bbbbbb', 'mx2', 200, now() - interval '1 hour', now() - interval '1 hour')"
        )
        await conn.execute(
            "INSERT INTO connection_slots VALUES ('gmail', 0, 'mx1:100:aaaaaa', now() + interval '1 minute')"
        )
    finally:
        await conn.close()


async def test_run_with_two_workers_shares_the_listeners_and_restarts_a_worker_that_dies(
    db_url, tenants, pool, world, tmp_path
):
    import aiohttp

    from mtad.simulate.smtp_sink import free_consecutive_ports_on, free_port_on
    from support.daemon import SubmissionLoad

    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 4, "initial_destination_concurrency": 4})
    smtp_port, http_port = free_port_on(["127.0.0.1"]), free_consecutive_ports_on(["127.0.0.1"], 2)
    document = delivering_process_document(db_url, tmp_path / "state", world, shaping, queue={"poll_interval": "200ms"})
    document["submission"] = {"listen": [f"127.0.0.1:{smtp_port}"], "implicit_tls_listen": []}
    document["http"] = {"listen": [f"127.0.0.1:{http_port}"]}
    document["cluster"] = {**CLUSTER, "workers": 2}
    supervisor = DaemonProcess(write_config(tmp_path / "mtad.toml", document))
    second = DaemonProcess(write_config(tmp_path / "second.toml", {**document, "state_dir": str(tmp_path / "s2")}))
    try:
        await asyncio.to_thread(supervisor.start)
        # Every worker listening (the supervisor's workers.ready: each said READY=1, which comes after its SMTP
        # listener), not just both registered as nodes, which they do before they listen.
        workers_ready = lambda: any(e.get("event") == "workers.ready" for e in supervisor.events())  # noqa: E731
        assert await until(workers_ready, timeout_s=20), supervisor.log_tail()
        assert await live_nodes_are(pool, 2)
        # A second supervisor of the same config would share the ports through SO_REUSEPORT: it refuses.
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{smtp_port} already in use"):
            await asyncio.to_thread(second.start)
        assert second.process.returncode == 1

        # Both workers answer on the one submission port (the kernel spreads 16 sessions over them); each
        # serves its own metrics on the HTTP port + its worker number.
        load = SubmissionLoad(lambda: smtp_port, lambda n: [f"r{n}@a.example"], messages=80, sessions=16)
        await load.run()
        accepted = len(load.accepted)  # sessions in flight when the 80th was answered finish theirs too
        assert accepted >= 80
        accepted_by_worker = {}
        async with aiohttp.ClientSession() as http:
            for k in range(2):
                async with http.get(f"http://127.0.0.1:{http_port + k}/metrics") as response:
                    metrics = await response.text()
                assert f'worker="{k}"' in metrics
                accepted_by_worker[k] = sum(
                    float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("mtad_ingest_submissions_total{") and 'result="accepted"' in line
                )
        assert sum(accepted_by_worker.values()) == accepted and min(accepted_by_worker.values()) > 0
        assert await until(lambda: all_final(pool, accepted), timeout_s=30)

        victim = await pool.fetchval("SELECT id FROM nodes ORDER BY started_at LIMIT 1")
        os.kill(int(victim.split(":")[1]), signal.SIGKILL)
        assert await until(lambda: replaced(pool, victim), timeout_s=30)  # restarted as a new node, the old reaped
        supervisor.signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0
        assert await pool.fetchval("SELECT count(*) FROM nodes") == 0  # both workers left cleanly
    finally:
        supervisor.kill()
        second.kill()


async def replaced(pool, victim: str) -> bool:
    ids = {r["id"] for r in await pool.fetch("SELECT id FROM nodes WHERE heartbeat_at > now() - interval '3 seconds'")}
    return len(ids) == 2 and victim not in ids

"""Bounded memory (issue 7 item 4): a `mtad run` process under thousands of connections and a deep queue.

The daemon is a real subprocess (its RSS is its own, not the test's), PostgreSQL is the session's cluster,
the connections are real TCP connections on loopback. Memory is read from /proc (VmRSS).
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from support.daemon import PASSWORD, DaemonProcess, daemon_document, write_config, write_shaping
from support.smtp_client import RawSMTP

from mtad.simulate.smtp_sink import SmtpSink

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from scale import preload_queue

MAX_CONNECTIONS = 500
PER_CLIENT = 100
CONNECT_CONCURRENCY = 50  # below asyncio's listen backlog of 100: no SYN is dropped and retried
ROUNDS = 5  # the allocator settles after two or three rounds; the last rounds must be flat
FDS_NEEDED = 2 * 2000 + 200  # the test's own 2,000 sockets, with room for the ones being closed

MESSAGE = (b"From: Acme News <news@acme.example>\r\nTo: someone@example.net\r\nSubject: after the flood\r\n"
           b"\r\nstill here\r\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def settled_rss_mb(pid: int, samples: int = 5) -> float:
    """The median of a few readings 0.1 s apart: one reading can catch a transient allocation."""
    readings = []
    for _ in range(samples):
        readings.append(rss_mb(pid))
        await asyncio.sleep(0.1)
    return statistics.median(readings)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture
def enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
            pytest.skip(f"needs {FDS_NEEDED} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- thousands of inbound connections -----------------------------------------------------------------

async def open_idle(port: int, source_ip: str, count: int, gate: asyncio.Semaphore, held: list) -> Counter:
    """`count` connections from `source_ip`; admitted ones (220) stay open in `held`, idle. A refused one must
    get one 421 line and then be closed by the daemon. Returns the first reply's code + enhanced code."""

    async def one() -> str:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0)), 15)
            line = (await asyncio.wait_for(reader.readline(), 15)).decode()
            if line.startswith("220"):
                held.append(writer)
                return "220"
            closed_by_daemon = await asyncio.wait_for(reader.read(), 15) == b""
            writer.close()
            return line[:9] if closed_by_daemon else f"{line[:9]} left open"

    return Counter(await asyncio.gather(*(one() for _ in range(count))))


async def flood(port: int) -> tuple[Counter, Counter, list]:
    """2,000 connections: 300 from 127.0.0.2 (over its per-client limit), then 100 from each of 127.0.0.3 ...
    127.0.0.19 (each within its own limit, together over the overall limit)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    held: list = []
    one_client = await open_idle(port, "127.0.0.2", 3 * PER_CLIENT, gate, held)
    many_clients = Counter()
    for results in await asyncio.gather(*(open_idle(port, f"127.0.0.{n}", PER_CLIENT, gate, held)
                                          for n in range(3, 20))):
        many_clients += results
    return one_client, many_clients, held


async def close_all(writers: list) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


@pytest.mark.slow
async def test_thousands_of_idle_connections_get_421_beyond_the_limits_and_memory_stays_bounded(
        db_url, tenants, tmp_path, enough_file_descriptors):
    document = daemon_document(db_url, tmp_path, max_connections=MAX_CONNECTIONS,
                               max_connections_per_client=PER_CLIENT)
    daemon = DaemonProcess(write_config(tmp_path / "mtad.toml", document))
    await asyncio.to_thread(daemon.start)
    try:
        port, pid = daemon.ports[0], daemon.process.pid
        warm, _ = await RawSMTP.open(port)  # the first session's lazy imports and buffers are not the flood's
        await warm.authenticated("acme", PASSWORD)
        await warm.close()
        baseline_mb, baseline_fds = await settled_rss_mb(pid), open_fds(pid)
        held_mb, after_mb = [], []
        for _ in range(ROUNDS):
            one_client, many_clients, held = await flood(port)
            # 127.0.0.2: its first 100 are admitted, the other 200 are over the per-client limit.
            assert one_client == {"220": PER_CLIENT, "421 4.7.0": 2 * PER_CLIENT}
            # The others fill the daemon up to 500 in all; the remaining 1,300 are over the overall limit.
            assert many_clients == {"220": MAX_CONNECTIONS - PER_CLIENT, "421 4.3.2": 1700 - 400}
            assert len(held) == MAX_CONNECTIONS
            held_mb.append(await settled_rss_mb(pid))
            await close_all(held)
            await asyncio.sleep(0.5)  # the daemon sees the FINs and drops the sessions
            after_mb.append(await settled_rss_mb(pid))
            assert open_fds(pid) <= baseline_fds + 5  # every session's socket was closed
        # Measured here: 500 idle sessions (aiosmtpd protocol, session, stream reader, a task each) add about
        # 5.5 MB, 11 KB a session. 15 MB leaves room for allocator slack and would be exceeded if the 1,500
        # refused connections had been admitted too (2,000 x 11 KB = 22 MB) or left something behind.
        assert held_mb[0] - baseline_mb < 15, (baseline_mb, held_mb)
        # Python keeps freed memory in its arenas, and the first rounds grow them (fragmentation: about 5 MB
        # once, measured 87, 91, 92.3, 92.5, 92.5 MB); after that closed sessions' memory is reused. A leak of
        # even 1 KB per connection (2,000 a round) would add 4 MB over the last two rounds.
        assert held_mb[-1] - held_mb[-3] < 3, held_mb
        assert after_mb[-1] - after_mb[-3] < 3, after_mb
        assert held_mb[-1] - held_mb[0] < 12, held_mb

        client, _ = await RawSMTP.open(port)  # a well-behaved client after the flood is served normally
        await client.authenticated("acme", PASSWORD)
        assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250
        assert (await client.command("RCPT TO:<after@example.net>"))[0] == 250
        assert (await client.command("DATA"))[0] == 354
        code, text = await client.command(MESSAGE + b".")
        assert code == 250, text
        await client.close()
        conn = await asyncpg.connect(db_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM recipients WHERE address = 'after@example.net'") == 1
        finally:
            await conn.close()
        assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")]
    finally:
        daemon.kill()


# -- a deep queue -------------------------------------------------------------------------------------

MAX_ACTIVE = 5000
SHALLOW, DEEP = 20_000, 200_000


async def held_recipients(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM recipients WHERE state = 'active'")


async def rss_when_claimed(daemon: DaemonProcess, conn: asyncpg.Connection) -> tuple[float, list[int]]:
    """Start the daemon, wait until it holds MAX_ACTIVE leased recipients, then read its RSS; also every count
    of held recipients seen on the way (never more than MAX_ACTIVE)."""
    await asyncio.to_thread(daemon.start)
    seen = [await held_recipients(conn)]
    deadline = time.monotonic() + 30
    while seen[-1] < MAX_ACTIVE and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen.append(await held_recipients(conn))
    await asyncio.sleep(1)  # the last batch routed into the scheduler
    rss = await settled_rss_mb(daemon.process.pid, samples=10)
    seen.append(await held_recipients(conn))
    return rss, seen


async def stop_and_requeue(daemon: DaemonProcess, conn: asyncpg.Connection) -> None:
    """Stop the daemon; leases of deliveries it cut at the stall go back to the queue (as reclaim would)."""
    daemon.signal(15)
    await asyncio.to_thread(daemon.wait, 30)
    await conn.execute("UPDATE recipients SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL "
                       "WHERE state = 'active'")


@pytest.mark.slow
async def test_the_daemon_holds_at_most_max_active_recipients_and_its_memory_does_not_grow_with_depth(
        db_url, tenants, tmp_path):
    # The sink never greets: every delivery stalls, so the scheduler fills up to its bound and stays there.
    # Each domain is a site of its own (a site whose speed is not known yet holds at most half of the bound).
    domains = [f"d{n}.example" for n in range(100)]
    shaping = write_shaping(tmp_path / "shaping.toml", domain={d: {"connection_limit": 20} for d in domains})
    async with SmtpSink("127.0.0.2", 0, stall_greeting_s=600) as sink:
        document = daemon_document(db_url, tmp_path)
        # write_config writes inline-table keys bare, and "*" is only valid TOML quoted.
        document["delivery"] = {"routes": {"*": f"127.0.0.2:{sink.port}"}, "max_active_recipients": MAX_ACTIVE,
                                "connect_timeout": "120s", "command_timeout": "120s", "shaping_file": str(shaping)}
        document["queue"] = {"poll_interval": "200ms", "lease": "300s", "reclaim_interval": "300s"}
        daemon = DaemonProcess(write_config(tmp_path / "mtad.toml", document))
        conn = await asyncpg.connect(db_url)
        try:
            tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = 'acme'")

            async def preload(recipients: int, tag: str) -> None:
                await preload_queue(conn, tenant_id=tenant_id, mail_from="news@acme.example", recipients=recipients,
                                    per_message=10, domains=domains, body=MESSAGE, tag=tag)
                await conn.execute("VACUUM ANALYZE recipients")

            await preload(SHALLOW, "shallow")
            shallow_mb, shallow_seen = await rss_when_claimed(daemon, conn)
            await stop_and_requeue(daemon, conn)
            await preload(DEEP - SHALLOW, "deep")
            assert await conn.fetchval("SELECT count(*) FROM recipients WHERE state = 'queued'") == DEEP
            deep_mb, deep_seen = await rss_when_claimed(daemon, conn)
            await stop_and_requeue(daemon, conn)
        finally:
            daemon.kill()
            await conn.close()
    assert max(shallow_seen) == max(deep_seen) == MAX_ACTIVE, (shallow_seen, deep_seen)
    assert shallow_seen[-1] == deep_seen[-1] == MAX_ACTIVE
    # The same 5,000 recipients held at both depths: the 180,000 more in PostgreSQL must not show in the daemon.
    # 10 MB is about 50 bytes per extra queued recipient; a per-queued-row cost of any kind would exceed it.
    assert abs(deep_mb - shallow_mb) < 10, (shallow_mb, deep_mb)

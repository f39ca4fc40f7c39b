"""Database faults under load (issue 7, item 2): a `mtad run` process against its own PostgreSQL cluster,
which the test stops and starts, and whose connections it cuts with pg_terminate_backend, in the middle of
submissions and deliveries.

While PostgreSQL is down a client gets 4xx (454 at AUTH, 451 at the end of DATA), never a 250; the daemon
stays up, and once PostgreSQL is back submission works again and delivery resumes without anyone's help.
Every message answered 250 is delivered, and no recipient is left `active` past its lease. When the outage
is shorter than the lease nothing is delivered twice; a longer one may repeat the attempts that were in
flight (their leases ran out meanwhile), at most one window per site.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import asyncpg
import pytest

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import migrate
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour
from support.daemon import (
    PASSWORD,
    DaemonProcess,
    SubmissionLoad,
    add_test_tenants,
    delivering_process_document,
    until,
    write_config,
    write_shaping,
)
from support.queue import queue_messages
from support.smtp_client import RawSMTP

DOMAINS = ("a.example", "b.example", "c.example")
CONNECTION_LIMIT = 4
LEASE_S = 20


def leaves_every_lease_time_to_finish(outage_s: float) -> bool:
    """A claim may wait in memory up to half a lease before its attempt (then it is released), and PostgreSQL
    takes a few seconds to come back: only a shorter outage is sure to let every attempt record its outcome."""
    return outage_s + LEASE_S / 2 + 5 < LEASE_S


def recipients_of(number: int) -> list[str]:
    return [f"m{number}@{DOMAINS[number % 3]}"] + ([f"m{number}x@{DOMAINS[(number + 1) % 3]}"] if number % 4 == 0 else [])


@pytest.fixture
def cluster(tmp_path):
    root = tmp_path.parent / f"{tmp_path.name}-pg"
    root.mkdir(mode=0o755)
    root.parent.chmod(0o755)  # the postgres user must reach it when the suite runs as root
    # durable: an immediate stop is a crash, and with synchronous_commit off a crash loses acknowledged commits
    cluster = EmbeddedPostgres(root / "pg", durable=True)
    cluster.start()
    yield cluster
    cluster.stop("immediate")


@pytest.fixture
async def admin(cluster):
    """The test's own connection (its application_name is not mtad's, so terminating mtad's spares it)."""
    conn = await asyncpg.connect(cluster.url())
    await migrate(conn)
    await add_test_tenants(conn)
    yield conn
    if not conn.is_closed():
        await conn.close()


@pytest.fixture
async def world():
    stall = SinkBehaviour(stall_after_data_s=0.02)
    async with RemoteWorld({"mx-a": stall, "mx-b": stall, "mx-c": stall}) as world:
        for domain, sink in zip(DOMAINS, ("mx-a", "mx-b", "mx-c")):
            world.add_domain(domain, sink=sink)
        yield world


def daemon_for(cluster, world, tmp_path, poll_interval: str) -> DaemonProcess:
    shaping = write_shaping(
        tmp_path / "shaping.toml",
        {"connection_limit": CONNECTION_LIMIT, "initial_destination_concurrency": CONNECTION_LIMIT},
    )
    document = delivering_process_document(
        cluster.url(), tmp_path / "state", world, shaping,
        queue={"lease": f"{LEASE_S}s", "poll_interval": poll_interval}, max_active_recipients=300,
    )
    document["database"]["connect_timeout"] = "2s"
    return DaemonProcess(write_config(tmp_path / "mtad.toml", document))


def running_port(process: DaemonProcess):
    return lambda: process.ports[0] if process.process is not None and process.process.poll() is None else None



async def drained(admin) -> bool:
    return not await admin.fetchval("SELECT count(*) FROM recipients WHERE state IN ('queued', 'deferred', 'active')")


async def queue_picture(admin) -> dict:
    """For failure messages: recipients by state (and active ones by whether their lease ran out)."""
    rows = await admin.fetch(
        "SELECT state, lease_expires_at < now() AS expired, next_attempt_at <= now() AS due, count(*) AS n "
        "FROM recipients GROUP BY 1, 2, 3"
    )
    return {(r["state"], r["expired"], r["due"]): r["n"] for r in rows}


async def check_every_accepted_recipient_delivered(load: SubmissionLoad, world: RemoteWorld, admin) -> Counter:
    """Returns how many copies each recipient got at its sink."""
    copies = Counter(rcpt for message in world.messages for rcpt in message.rcpt_tos)
    states = {r["address"]: r["state"] for r in await admin.fetch("SELECT address, state FROM recipients")}
    accepted = load.accepted_recipients()
    lost = sorted(r for r in accepted if copies[r] == 0 or states.get(r) != "delivered")
    print(
        f"offered {len(load.attempts)}, accepted {len(load.accepted)} ({len(accepted)} recipients), "
        f"refusals {Counter(a.code for a in load.not_accepted)}, session refusals "
        f"{Counter(code for _, code in load.session_replies)}, lost {len(lost)}, "
        f"duplicates {sum(n - 1 for n in copies.values() if n > 1)}"
    )
    assert lost == []
    assert set(copies) <= set(states)  # nothing reached a sink that was not stored
    assert not await admin.fetchval(
        "SELECT count(*) FROM recipients WHERE state = 'active' AND lease_expires_at < now()"
    )
    return copies


async def log_in_anew(port: int) -> tuple[int, str]:
    client, _ = await RawSMTP.open(port)
    try:
        await client.command("EHLO late.test")
        await client.starttls()
        await client.command("EHLO late.test")
        return await client.login("acme", PASSWORD)
    finally:
        await client.close()


async def run_outage(cluster, admin, world, tmp_path, outage_s: float) -> None:
    process = daemon_for(cluster, world, tmp_path, poll_interval="1s")
    messages = 600
    load = SubmissionLoad(running_port(process), recipients_of, messages, sessions=3, deadline_s=120 + outage_s)
    await admin.close()
    try:
        await asyncio.to_thread(process.start)
        loading = asyncio.create_task(load.run())
        assert await load.until_accepted(messages // 4, timeout_s=60)
        await asyncio.to_thread(cluster.stop, "immediate")  # in the middle of submissions and deliveries
        stopped_at = time.monotonic()
        login_reply = await log_in_anew(process.ports[0])  # a client arriving now cannot be checked
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
        restarting_at = time.monotonic()
        assert process.process.poll() is None, "the daemon exited while the database was away"
        await asyncio.to_thread(cluster.start)
        await asyncio.wait_for(loading, 120 + outage_s)
        admin = await asyncpg.connect(cluster.url())
        assert await until(lambda: drained(admin), timeout_s=LEASE_S + 60), (await queue_picture(admin), process.log_path)
        assert process.process.poll() is None
    finally:
        process.kill()
    during = [a for a in load.attempts if stopped_at < a.sent_at and a.replied_at < restarting_at]
    refused_logins = [code for at, code in load.session_replies if stopped_at < at < restarting_at]
    assert during or refused_logins, "no submission was tried while the database was down"
    assert all(400 <= a.code < 500 for a in during), Counter(a.code for a in during)
    assert all(400 <= code < 500 for code in refused_logins)
    assert login_reply[0] == 454 and login_reply[1][4:9] == "4.7.0", login_reply
    assert len(load.accepted) >= messages
    assert any(a.sent_at > restarting_at for a in load.accepted)  # submission works again
    assert any(m.mail_at > restarting_at for m in world.messages)  # delivery resumed by itself
    copies = await check_every_accepted_recipient_delivered(load, world, admin)
    duplicates = sum(n - 1 for n in copies.values() if n > 1)
    if leaves_every_lease_time_to_finish(outage_s):
        assert duplicates == 0
    else:  # leases ran out during the outage: what was in flight may go twice, at most a window per site
        assert duplicates <= CONNECTION_LIMIT * len(DOMAINS)
    await admin.close()


async def test_postgres_stopped_mid_load_gives_4xx_never_250_and_delivery_resumes_by_itself(
    cluster, admin, world, tmp_path
):
    await run_outage(cluster, admin, world, tmp_path, outage_s=float(os.environ.get("MTAD_DB_OUTAGE_S", "4")))


@pytest.mark.slow
async def test_daemon_outlives_a_postgres_outage_longer_than_the_lease(cluster, admin, world, tmp_path):
    await run_outage(cluster, admin, world, tmp_path, outage_s=30)


async def terminate_mtad_backends(admin) -> int:
    return await admin.fetchval(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'mtad' AND pid <> pg_backend_pid()) AS t"
    )


async def listening(admin) -> bool:
    return bool(
        await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mtad' AND query LIKE 'LISTEN%'"
        )
    )


async def test_terminated_connections_mid_load_lose_nothing_and_notify_wakeups_still_work(
    cluster, admin, world, tmp_path
):
    # A long poll interval: a recipient delivered within a few seconds was found through a NOTIFY.
    poll_interval_s = 30
    process = daemon_for(cluster, world, tmp_path, poll_interval=f"{poll_interval_s}s")
    messages = 600
    load = SubmissionLoad(running_port(process), recipients_of, messages, sessions=3, deadline_s=150)
    terminated = []
    try:
        await asyncio.to_thread(process.start)
        assert await until(lambda: listening(admin), timeout_s=10)
        loading = asyncio.create_task(load.run())
        for fraction in (4, 2, 1.33):
            assert await load.until_accepted(int(messages / fraction), timeout_s=60)
            terminated.append(await terminate_mtad_backends(admin))  # pool and LISTEN connections alike
        await asyncio.wait_for(loading, 150)
        assert len(load.accepted) >= messages
        assert await until(lambda: drained(admin), timeout_s=LEASE_S + poll_interval_s + 30), (
            await queue_picture(admin), process.log_path
        )
        # The NOTIFY path after a cut: once the listener is back and the claimer has gone back to sleep
        # (it claims once on reconnecting), mail queued by another node is claimed on that node's NOTIFY.
        terminated.append(await terminate_mtad_backends(admin))
        assert await until(lambda: listening(admin), timeout_s=15)
        await asyncio.sleep(1.0)
        before = len(world.sinks["mx-a"].messages)
        await queue_messages(admin, [["after-cut@a.example"]])
        await admin.execute("SELECT pg_notify('mtad_queue', '')")
        woken_at = time.monotonic()
        assert await until(lambda: _more_than(world.sinks["mx-a"], before), timeout_s=poll_interval_s / 3)
        print(f"terminated {terminated}; delivered {time.monotonic() - woken_at:.2f}s after the NOTIFY")
        assert process.process.poll() is None
    finally:
        process.kill()
    assert all(n >= 2 for n in terminated)  # at least one pooled connection and the listener each time
    copies = await check_every_accepted_recipient_delivered(load, world, admin)
    assert sum(n - 1 for n in copies.values() if n > 1) == 0


async def _more_than(sink, count: int) -> bool:
    return len(sink.messages) > count

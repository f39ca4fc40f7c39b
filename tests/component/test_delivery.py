"""Delivery end to end: a real daemon, a real PostgreSQL, a DNS server and SMTP sinks on 127.0.0.x."""

from __future__ import annotations

import asyncio
import time

import dkim
import pytest

from mtad.sign.keys import dns_record_name, dns_record_value, generate_private_key, write_key
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour
from support.daemon import PASSWORD, start_delivering, until, write_shaping
from support.queue import queue_messages
from support.smtp_client import RawSMTP

async def states(pool) -> dict[str, int]:
    return {r["state"]: r["n"] for r in await pool.fetch("SELECT state, count(*) AS n FROM recipients GROUP BY state")}



@pytest.fixture
async def world():
    async with RemoteWorld(["mx-a", "mx-b", "mx-c"]) as world:
        world.add_domain("a.example", sink="mx-a")
        world.add_domain("b.example", sink="mx-b")
        world.add_domain("c.example", sink="mx-c")
        yield world


@pytest.fixture
def shaping(tmp_path):
    return write_shaping(tmp_path / "shaping.toml", {"connection_limit": 5, "initial_destination_concurrency": 2})


async def test_submitted_mail_is_delivered_to_the_right_sink_with_rsa_and_ed25519_signatures(
    db_url, tenants, pool, world, tmp_path, shaping
):
    keys = {
        algo: write_key(tmp_path / "state" / "dkim", "acme.example", f"s-{algo}", generate_private_key(algo))
        for algo in ("rsa", "ed25519")
    }
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
    try:
        port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
        client, _ = await RawSMTP.open(port)
        await client.authenticated("acme", PASSWORD)
        await client.command("MAIL FROM:<news@acme.example>")
        await client.command("RCPT TO:<alice@a.example>")
        await client.command("RCPT TO:<bob@b.example>")
        await client.command("DATA")
        code, text = await client.command(b"From: News <news@acme.example>\r\nSubject: hi\r\n\r\nHello!\r\n.")
        assert code == 250, text
        await client.close()
        (at_a,) = await world.sinks["mx-a"].wait_for_messages(1, timeout_s=20)
        (at_b,) = await world.sinks["mx-b"].wait_for_messages(1, timeout_s=20)
    finally:
        await daemon.stop()
    assert at_a.rcpt_tos == ["alice@a.example"] and at_b.rcpt_tos == ["bob@b.example"]
    records = {dns_record_name(k).encode() + b".": dns_record_value(k).encode() for k in keys.values()}
    verifier = dkim.DKIM(at_a.data)
    assert verifier.verify(dnsfunc=lambda name, timeout=5: records[name], idx=0)
    assert verifier.verify(dnsfunc=lambda name, timeout=5: records[name], idx=1)
    assert at_a.data.count(b"DKIM-Signature:") == 2
    assert await until(lambda: states(pool)) == {"delivered": 2}
    events = await pool.fetch("SELECT kind, site, mx_host, duration_ms FROM events ORDER BY id")
    assert [e["kind"] for e in events] == ["delivered", "delivered"]
    assert all(e["mx_host"] and e["site"] and e["duration_ms"] is not None for e in events)


async def test_a_site_that_allows_two_sessions_gets_two_with_few_421s(db_url, tenants, pool, tmp_path):
    async with RemoteWorld({"mx": SinkBehaviour(max_concurrent_sessions=2)}) as world:
        world.add_domain("narrow.example", sink="mx")
        shaping = write_shaping(
            tmp_path / "shaping.toml",
            {"connection_limit": 10, "initial_destination_concurrency": 4, "backoff_for": "2s"},
        )
        await queue_messages(pool, [[f"r{n}@narrow.example"] for n in range(200)])
        daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
        try:
            assert await until(lambda: _delivered(pool, 200), timeout_s=60)
        finally:
            await daemon.stop()
        sink = world.sinks["mx"]
    assert len(sink.messages) == 200
    assert sink.max_concurrent_sessions == 2
    assert sink.rejected_connections <= 10  # bounded: backoff, not hammering


async def test_max_message_rate_is_respected_within_ten_percent(db_url, tenants, pool, world, tmp_path):
    shaping = write_shaping(
        tmp_path / "shaping.toml",
        {"connection_limit": 5, "initial_destination_concurrency": 5, "max_message_rate": "10/s"},
    )
    await queue_messages(pool, [[f"r{n}@a.example"] for n in range(41)])
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
    try:
        messages = await world.sinks["mx-a"].wait_for_messages(41, timeout_s=30)
    finally:
        await daemon.stop()
    times = sorted(m.received_at for m in messages)
    rate = (len(times) - 1) / (times[-1] - times[0])  # the first one may go in the initial burst
    assert 9.0 <= rate <= 11.0, rate


async def backlog_at_a_then_one_at_b(db_url, pool, world, shaping, tmp_path, timeout_s: float):
    """300 recipients at a.example queued before one at b.example, then a daemon that holds at most 40: the
    daemon (still running) and how long b.example's message took to reach its sink."""
    await queue_messages(pool, [[f"r{n}@a.example"] for n in range(300)])
    await queue_messages(pool, [["first@b.example"]])
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping, max_active_recipients=40)
    started = time.monotonic()
    try:
        await world.sinks["mx-b"].wait_for_messages(1, timeout_s=timeout_s)
    except BaseException:
        await daemon.stop()
        raise
    return daemon, time.monotonic() - started


async def test_a_rate_limited_sites_backlog_does_not_hold_up_mail_to_other_sites(
    db_url, tenants, pool, world, tmp_path
):
    # 300 recipients at a.example (2 messages/s) are queued before one at b.example. The daemon holds at most
    # 40 recipients: a.example's backlog in queue order used to fill them all, and b.example's message waited
    # for a.example to send ~270 of its own (over two minutes).
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 2, "initial_destination_concurrency": 2},
                            domain={"a.example": {"max_message_rate": "2/s"}})
    daemon, waited_s = await backlog_at_a_then_one_at_b(db_url, pool, world, shaping, tmp_path, timeout_s=15)
    try:
        # a.example's backlog went back to the queue spread over the time the site needs for it, 2 a second,
        # each recipient due once at its turn: not all due again at once
        rows = await until(lambda: pool.fetch(
            "SELECT extract(epoch FROM next_attempt_at - now()) AS due_in_s FROM recipients"
            " WHERE domain = 'a.example' AND state = 'queued' AND next_attempt_at > now() + interval '20 seconds'"
            " ORDER BY next_attempt_at"), timeout_s=10)
        delivered_at_a = len(world.sinks["mx-a"].messages)
    finally:
        await daemon.stop()
    assert waited_s < 10, waited_s
    assert delivered_at_a < 60  # b.example did not wait for a.example's backlog
    due_in_s = [float(r["due_in_s"]) for r in rows]
    assert len(due_in_s) > 200 and due_in_s[-1] > 100  # up to ~150 s out
    spread = (due_in_s[-1] - due_in_s[0]) / (len(due_in_s) - 1)
    assert 0.4 <= spread <= 0.6, spread  # one every 1/rate
    states_now = await states(pool)
    assert states_now.get("active", 0) == 0 and sum(states_now.values()) == 301  # nothing lost on the way


async def test_a_slow_mx_without_a_message_rate_does_not_hold_up_mail_to_other_sites(
    db_url, tenants, pool, world, tmp_path
):
    # a.example's MX takes a second to answer each message and allows two sessions: 2 messages/s. Its 300
    # recipients are queued before one at b.example; the daemon holds at most 40. Without a cap on what a site
    # without a message rate holds, a.example's backlog filled all 40 in queue order, and b.example's message
    # had not arrived after 20 s.
    world.sinks["mx-a"].behaviour = SinkBehaviour(stall_after_data_s=1.0)
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 2, "initial_destination_concurrency": 2})
    daemon, waited_s = await backlog_at_a_then_one_at_b(db_url, pool, world, shaping, tmp_path, timeout_s=20)
    try:
        await world.sinks["mx-a"].wait_for_messages(20, timeout_s=20)  # a.example goes on at its own pace
        put_back = await pool.fetchval(
            "SELECT count(*) FROM recipients WHERE domain = 'a.example' AND state = 'queued'"
            " AND next_attempt_at > now()")
    finally:
        await daemon.stop()
    assert waited_s < 5, waited_s
    assert put_back > 200  # waiting in PostgreSQL for their turn, not in the daemon's memory
    states_now = await states(pool)
    assert states_now.get("active", 0) == 0 and sum(states_now.values()) == 301  # nothing lost on the way
    received = [rcpt for m in world.sinks["mx-a"].messages for rcpt in m.rcpt_tos]
    assert len(received) == len(set(received))  # none twice


async def test_recipients_put_back_for_their_turn_are_each_delivered_once_at_the_sites_rate(
    db_url, tenants, pool, world, tmp_path
):
    from mtad.observe.metrics import POSTPONED

    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 5, "initial_destination_concurrency": 5},
                            domain={"a.example": {"max_message_rate": "10/s"}})
    await queue_messages(pool, [[f"r{n}@a.example"] for n in range(40)])
    postponed_before = POSTPONED._value.get()
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping, max_active_recipients=10)
    try:
        messages = await world.sinks["mx-a"].wait_for_messages(40, timeout_s=20)
        assert await until(lambda: all_delivered(pool, 40), timeout_s=10)
    finally:
        await daemon.stop()
    assert POSTPONED._value.get() - postponed_before >= 30  # at most 5 held (half of 10), the rest put back
    received = sorted(rcpt for m in messages for rcpt in m.rcpt_tos)
    assert received == sorted(f"r{n}@a.example" for n in range(40))  # each once
    times = sorted(m.received_at for m in messages)
    assert (len(times) - 1) / (times[-1] - times[0]) <= 11.0  # never faster than the site's rate


async def all_delivered(pool, n: int) -> bool:
    return await pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'delivered'") == n


async def test_a_dead_site_does_not_slow_delivery_to_other_sites(db_url, tenants, pool, world, tmp_path):
    shaping = write_shaping(tmp_path / "shaping.toml", {"dead_for": "30s"})
    await world.sinks["mx-c"].stop()  # c.example's MX refuses connections
    world.sinks["mx-b"].behaviour = SinkBehaviour(stall_greeting_s=3.0)  # b.example is very slow
    await queue_messages(pool, [[f"r{n}@c.example"] for n in range(50)] + [[f"s{n}@b.example"] for n in range(4)])
    await queue_messages(pool, [[f"q{n}@a.example"] for n in range(100)])
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping, status_interval="200ms")
    try:
        started = time.monotonic()
        await world.sinks["mx-a"].wait_for_messages(100, timeout_s=20)
        fast_site_s = time.monotonic() - started
        deferred = await until(
            lambda: pool.fetchval("SELECT count(*) FROM recipients WHERE domain = 'c.example' AND state = 'deferred'"),
        )
        sites = await until(lambda: pool.fetch("SELECT site, health, last_error FROM site_status WHERE health = 'dead'"))
    finally:
        await daemon.stop()
    assert fast_site_s < 20
    assert deferred == 50
    assert len(sites) == 1 and "connect" in sites[0]["last_error"].lower()
    reply = await pool.fetchval("SELECT last_reply FROM recipients WHERE domain = 'c.example' LIMIT 1")
    assert "refused" in reply.lower() or "connect" in reply.lower()


async def test_450_defers_and_retries_550_bounces_null_mx_bounces_at_once(db_url, tenants, pool, world, tmp_path, shaping):
    world.sinks["mx-a"].behaviour = SinkBehaviour(
        recipient_replies={
            "later@a.example": "450 4.2.0 mailbox busy",
            "gone@a.example": "550 5.1.1 no such user",
            "blocked@a.example": "554 5.7.1 Service unavailable; client host blocked using a blocklist",
        }
    )
    world.dns.null_mx("nomail.example")
    await queue_messages(
        pool, [["later@a.example"], ["gone@a.example"], ["ok@a.example"], ["x@nomail.example"], ["blocked@a.example"]]
    )
    daemon = await start_delivering(
        db_url, tmp_path / "state", world, shaping, minimal_backoff_time="1s", maximal_backoff_time="1s", retry_jitter=0
    )
    try:
        rows = await until(lambda: _all_tried(pool, 5))
        by_address = {r["address"]: r for r in rows}
        assert by_address["later@a.example"]["state"] == "deferred"
        assert by_address["gone@a.example"]["state"] == "bounced"
        assert by_address["gone@a.example"]["last_enhanced"] == "5.1.1"
        suppressed = await pool.fetch("SELECT address, reason, source FROM suppressions ORDER BY address")
        assert [tuple(r) for r in suppressed] == [  # 550 5.1.1 and a null MX are hard; 450 and 5.7.1 are not
            ("gone@a.example", "hard_bounce", "smtp"),
            ("x@nomail.example", "hard_bounce", "smtp"),
        ]
        category = await pool.fetchval("SELECT category FROM events WHERE kind = 'bounced' AND code = 550")
        assert category == "invalid_recipient"
        assert by_address["ok@a.example"]["state"] == "delivered"
        assert by_address["x@nomail.example"]["state"] == "bounced"
        assert by_address["x@nomail.example"]["last_code"] == 556
        assert by_address["blocked@a.example"]["state"] == "bounced"  # bounced, but a block is not her fault:
        world.sinks["mx-a"].behaviour = SinkBehaviour()  # the mailbox is no longer busy
        assert await until(
            lambda: pool.fetchval("SELECT state = 'delivered' FROM recipients WHERE address = 'later@a.example'")
        )
        attempts = await pool.fetchval("SELECT attempts FROM recipients WHERE address = 'later@a.example'")
    finally:
        await daemon.stop()
    assert attempts == 2


async def test_a_recipient_deferred_past_the_queue_lifetime_expires(db_url, tenants, pool, world, tmp_path, shaping):
    world.sinks["mx-a"].behaviour = SinkBehaviour(recipient_replies={"a.example": "451 4.3.0 try later"})
    await queue_messages(pool, [["never@a.example"]])
    daemon = await start_delivering(
        db_url, tmp_path / "state", world, shaping,
        minimal_backoff_time="1s", maximal_backoff_time="1s", retry_jitter=0, maximal_queue_lifetime="3s",
    )
    try:
        state = await until(
            lambda: pool.fetchval("SELECT state FROM recipients WHERE state = 'expired'"), timeout_s=20
        )
    finally:
        await daemon.stop()
    assert state == "expired"


async def test_a_thousand_messages_to_one_site_reuse_connections(db_url, tenants, pool, world, tmp_path):
    shaping = write_shaping(
        tmp_path / "shaping.toml",
        {"connection_limit": 4, "initial_destination_concurrency": 4, "max_deliveries_per_connection": 1000},
    )
    await queue_messages(pool, [[f"r{n}@a.example"] for n in range(1000)])
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
    try:
        await world.sinks["mx-a"].wait_for_messages(1000, timeout_s=90)
    finally:
        await daemon.stop()
    assert world.sinks["mx-a"].connections_total <= 20
    assert await until(lambda: _delivered(pool, 1000))


async def test_a_pooled_connection_the_server_closed_while_idle_is_replaced_without_a_deferral(
    db_url, tenants, pool, world, tmp_path
):
    # The server's idle timeout fires just as our RSET probe of the pooled session goes out: 421 and close.
    sink = world.sinks["mx-a"]
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 1, "idle_timeout": "60s"})
    daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
    try:
        await queue_messages(pool, [["first@a.example"]])
        await sink.wait_for_messages(1, timeout_s=15)
        sink.behaviour = SinkBehaviour(hang_up_at_rset=True)
        await queue_messages(pool, [["second@a.example"]])
        await sink.wait_for_messages(2, timeout_s=15)
    finally:
        await daemon.stop()
    assert sink.connections_total == 2
    kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM events ORDER BY id")]
    assert kinds == ["delivered", "delivered"]  # no deferral: the dead connection was no attempt


async def _delivered(pool, n: int) -> bool:
    return await pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'delivered'") == n


async def _all_tried(pool, n: int):
    rows = await pool.fetch("SELECT address, state, last_code, last_enhanced FROM recipients WHERE attempts > 0")
    return rows if len(rows) == n else None


async def test_kill_9_during_delivery_loses_nothing_and_repeats_only_what_was_in_flight(
    db_url, tenants, pool, world, tmp_path
):
    from collections import Counter

    from support.daemon import DaemonProcess, daemon_document, delivery_document, write_config

    world.sinks["mx-a"].behaviour = SinkBehaviour(stall_after_data_s=0.01)
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 4, "initial_destination_concurrency": 4})
    document = daemon_document(db_url, tmp_path / "state")
    document["delivery"] = delivery_document(world, shaping)
    document["queue"] = {"lease": "3s", "reclaim_interval": "1s", "poll_interval": "200ms"}
    process = DaemonProcess(write_config(tmp_path / "mtad.toml", document))
    await queue_messages(pool, [[f"r{n}@a.example"] for n in range(400)])
    sink = world.sinks["mx-a"]
    try:
        process.start()
        await until(lambda: _at_least(sink, 120), timeout_s=30, interval_s=0.01)
        process.kill()
        delivered_before_kill = len(sink.messages)
        process.start()
        assert await until(lambda: _delivered(pool, 400), timeout_s=60)
    finally:
        process.kill()
    received = Counter(rcpt for m in sink.messages for rcpt in m.rcpt_tos)
    assert set(received) == {f"r{n}@a.example" for n in range(400)}  # none lost
    duplicates = {rcpt: n for rcpt, n in received.items() if n > 1}
    assert all(n == 2 for n in duplicates.values())
    assert len(duplicates) <= 4  # at most what was in flight at the kill: the window was 4
    assert delivered_before_kill < 400


async def _at_least(sink, n: int) -> bool:
    return len(sink.messages) >= n


async def test_starttls_is_used_when_offered_and_required_tls_defers_when_it_is_not(db_url, tenants, pool, tmp_path):
    async with RemoteWorld(
        {"tls": SinkBehaviour(starttls=True), "plain": SinkBehaviour()},
        hostnames={"tls": "mx.tls.example", "plain": "mx.plain.example"},
    ) as world:
        world.add_domain("secure.example", sink="tls", mx_host="mx.tls.example")
        world.add_domain("plain.example", sink="plain", mx_host="mx.plain.example")
        shaping = write_shaping(tmp_path / "shaping.toml", domain={"plain.example": {"tls": "required"}})
        await queue_messages(pool, [["a@secure.example"], ["b@plain.example"]])
        daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
        try:
            (message,) = await world.sinks["tls"].wait_for_messages(1, timeout_s=20)
            reply = await until(
                lambda: pool.fetchval("SELECT last_reply FROM recipients WHERE address = 'b@plain.example' AND attempts > 0")
            )
            tls_version = await until(
                lambda: pool.fetchval("SELECT tls_version FROM events WHERE kind = 'delivered'")
            )
        finally:
            await daemon.stop()
        assert message.tls
        assert tls_version.startswith("TLS")
        assert "does not offer STARTTLS" in reply
        assert world.sinks["plain"].messages == []


async def test_certificate_is_checked_against_the_mx_host_name_when_verification_is_on(db_url, tenants, pool, tmp_path):
    async with RemoteWorld({"tls": SinkBehaviour(starttls=True)}, hostnames={"tls": "mx.right.example"}) as world:
        world.add_domain("wrong.example", sink="tls", mx_host="mx.wrong-name.example")  # cert says mx.right.example
        shaping = write_shaping(tmp_path / "shaping.toml", {"tls": "required", "tls_verify": True})
        await queue_messages(pool, [["a@wrong.example"]])
        daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
        try:
            reply = await until(
                lambda: pool.fetchval("SELECT last_reply FROM recipients WHERE attempts > 0"), timeout_s=20
            )
        finally:
            await daemon.stop()
        assert world.sinks["tls"].messages == []
        assert "SSL" in reply or "certificate" in reply.lower()


async def test_a_delivery_slower_than_its_lease_is_not_reclaimed_and_sent_twice(db_url, tenants, pool, world, tmp_path):
    # The server takes 4 s to answer the final dot; the lease is 3 s: the node renews the lease of what
    # it has in flight, so its own reclaim task (every second) never hands the recipient out again.
    from support.daemon import daemon_document, delivery_document

    from mtad.app import Daemon
    from mtad.config import parse_settings

    world.sinks["mx-a"].behaviour = SinkBehaviour(stall_after_data_s=4.0)
    shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 2})
    document = daemon_document(db_url, tmp_path / "state")
    document["delivery"] = delivery_document(world, shaping, data_timeout="10s")
    document["queue"] = {"lease": "3s", "reclaim_interval": "1s", "poll_interval": "200ms"}
    daemon = Daemon(parse_settings(document, {}), None)
    await daemon.start()
    try:
        await queue_messages(pool, [["slow@a.example"]])
        assert await until(lambda: _delivered(pool, 1), timeout_s=20)
        await asyncio.sleep(2)  # a second copy, if reclaimed, would arrive within this
    finally:
        await daemon.stop()
    assert [rcpt for m in world.sinks["mx-a"].messages for rcpt in m.rcpt_tos] == ["slow@a.example"]
    assert not await pool.fetchval("SELECT count(*) FROM events WHERE kind = 'reclaimed'")

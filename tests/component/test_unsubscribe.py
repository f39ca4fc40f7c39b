"""Unsubscribes end to end: the headers on the wire, the one-click endpoint, suppression everywhere."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone

import aiohttp
import dkim

from mtad.policy.feedback_token import UNSUBSCRIBE, make_token
from mtad.queue.controls import QueueControls
from mtad.sign.keys import dns_record_name, dns_record_value, generate_private_key, write_key
from mtad.simulate.remote_world import RemoteWorld
from support.daemon import PASSWORD, start_delivering, until, write_shaping
from support.smtp_client import RawSMTP

BOUNCE_DOMAIN = "bounces.mtad.example"


async def submit(daemon, rcpt: str, *, message_class: str | None = None, list_name: str | None = None) -> str:
    port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    await client.command("MAIL FROM:<news@acme.example>")
    await client.command(f"RCPT TO:<{rcpt}>")
    await client.command("DATA")
    headers = b"From: Acme <news@acme.example>\r\nSubject: offers\r\n"
    if message_class:
        headers += f"X-Mtad-Class: {message_class}\r\n".encode()
    if list_name:
        headers += f"X-Mtad-List: {list_name}\r\n".encode()
    code, text = await client.command(headers + b"List-Unsubscribe: <https://tenant.example/own>\r\n\r\nbody\r\n.")
    await client.close()
    assert code == 250, text
    return text


def unsubscribe_url(data: bytes) -> str:
    header = re.search(rb"^List-Unsubscribe: (.*)$", data, re.MULTILINE).group(1).decode()
    return re.search(r"<(http[^>]+)>", header).group(1)



async def test_one_click_unsubscribe_stops_marketing_but_not_transactional_mail(db_url, tenants, pool, tmp_path):
    key = write_key(tmp_path / "state" / "dkim", "acme.example", "s1", generate_private_key("rsa"))
    async with RemoteWorld(["mx"]) as world:
        world.add_domain("a.example", sink="mx")
        sink = world.sinks["mx"]
        shaping = write_shaping(tmp_path / "shaping.toml")
        daemon = await start_delivering(db_url, tmp_path / "state", world, shaping)
        try:
            await submit(daemon, "alice@a.example", list_name="offers")
            await submit(daemon, "alice@a.example", message_class="transactional")
            marketing, transactional = sorted(
                await sink.wait_for_messages(2, timeout_s=20), key=lambda m: b"List-Unsubscribe:" not in m.data
            )
            # headers on the wire: mtad's own, inside the DKIM signature, and none on transactional mail
            assert marketing.data.count(b"List-Unsubscribe:") == 1 and b"tenant.example/own" not in marketing.data
            assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in marketing.data
            signature = re.search(rb"DKIM-Signature:(.*?)\r\n(?=\S)", marketing.data, re.S).group(1)
            signed = re.search(rb"h=([^;]+);", re.sub(rb"\s", b"", signature)).group(1).split(b":")
            assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed
            records = {dns_record_name(key).encode() + b".": dns_record_value(key).encode()}
            assert dkim.verify(marketing.data, dnsfunc=lambda name, timeout=5: records[name])
            assert b"List-Unsubscribe" not in transactional.data and b"X-Mtad-Class" not in transactional.data
            url = unsubscribe_url(marketing.data)

            # more mail waits while the domain is paused
            await QueueControls(pool).pause(datetime.now(timezone.utc), domain="a.example")
            await submit(daemon, "alice@a.example", list_name="offers")
            await submit(daemon, "alice@a.example", message_class="transactional")
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as page:
                    assert page.status == 200 and "Unsubscribe" in await page.text()
                    assert "a****@a.example" in await page.text() and "Set-Cookie" not in page.headers
                assert await pool.fetchval("SELECT count(*) FROM suppressions") == 0  # a GET changes nothing
                tampered = url[:-3] + ("aaa" if not url.endswith("aaa") else "bbb")
                async with http.post(tampered, data={"List-Unsubscribe": "One-Click"}) as refused:
                    assert refused.status == 404
                async with http.post(url, data={"something": "else"}) as refused:
                    assert refused.status == 400
                assert await pool.fetchval("SELECT count(*) FROM suppressions") == 0
                async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as done:
                    assert done.status == 200 and "Set-Cookie" not in done.headers
            suppression = await pool.fetchrow("SELECT address, list_id, reason, source FROM suppressions")
            assert dict(suppression) == {
                "address": "alice@a.example", "list_id": "offers", "reason": "unsubscribed", "source": "one_click"
            }
            states = {
                r["class"]: r["state"]
                for r in await pool.fetch(
                    "SELECT m.class, r.state FROM recipients r JOIN messages m ON m.id = r.message_id "
                    "WHERE r.state IN ('queued', 'deferred', 'cancelled')"
                )
            }
            assert states == {"marketing": "cancelled", "transactional": "queued"}
            reply = await submit(daemon, "alice@a.example", list_name="offers")
            assert "1 of 1 recipients suppressed (unsubscribed)" in reply
            await submit(daemon, "alice@a.example", list_name="other-list")  # another list still reaches her
            await QueueControls(pool).resume(datetime.now(timezone.utc), domain="a.example")
            await sink.wait_for_messages(4, timeout_s=20)
            await asyncio.sleep(0.5)
        finally:
            await daemon.stop()
    assert len(sink.messages) == 4
    assert b"X-Mtad-List" not in sink.messages[3].data


async def test_unsubscribing_100_of_10000_queued_means_no_mail_to_them(db_url, tenants, pool, tmp_path):
    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    now = datetime.now(timezone.utc)
    await pool.execute(
        """WITH m AS (
               INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, received_at, body, class)
               SELECT 'LOAD' || g, $1, 'news@acme.example', 60, $2::timestamptz + g * interval '1 ms',
                      convert_to('From: news@acme.example' || chr(13) || chr(10) || chr(13) || chr(10) || 'hi', 'UTF8'),
                      'marketing'
               FROM generate_series(1, 10000) AS g RETURNING id, queue_id, received_at)
           INSERT INTO recipients (message_id, tenant_id, address, domain, queued_at, next_attempt_at, updated_at)
           SELECT id, $1, 'user' || substr(queue_id, 5) || '@d' || (substr(queue_id, 5)::int % 50) || '.example',
                  'd' || (substr(queue_id, 5)::int % 50) || '.example', received_at, received_at, received_at
           FROM m""",
        tenant_id,
        now,
    )
    leaving = [f"user{n}@d{n % 50}.example" for n in range(9901, 10001)]  # the last 100 in queue order
    async with RemoteWorld(["mx"]) as world:
        shaping = write_shaping(tmp_path / "shaping.toml", {"connection_limit": 8, "initial_destination_concurrency": 8,
                                                            "max_message_rate": "600/s"})
        daemon = await start_delivering(
            db_url, tmp_path / "state", world, shaping, routes={"*": f"{world.ip_of('mx')}:{world.smtp_port}"},
        )
        try:
            await world.sinks["mx"].wait_for_messages(500, timeout_s=30)
            rows = await pool.fetch(
                "SELECT id, address FROM recipients WHERE address = ANY($1::text[])", leaving
            )
            base = f"http://127.0.0.1:{daemon.http.bound[0][1]}/u/"
            latencies = []
            async with aiohttp.ClientSession() as http:
                for row in rows:
                    token = make_token(daemon.feedback_key, UNSUBSCRIBE, tenant_id, row["id"])
                    started = time.monotonic()
                    async with http.post(base + token, data={"List-Unsubscribe": "One-Click"}) as response:
                        assert response.status == 200
                    latencies.append(time.monotonic() - started)
            assert await until(
                lambda: pool.fetchval("SELECT count(*) = 0 FROM recipients WHERE state IN ('queued','deferred','active')"),
                timeout_s=60,
            )
        finally:
            await daemon.stop()
        received = {rcpt for m in world.sinks["mx"].messages for rcpt in m.rcpt_tos}
    assert not received & set(leaving)  # zero deliveries to the 100 who left
    assert len(received) == 9900
    assert await pool.fetchval("SELECT count(*) FROM recipients WHERE state = 'cancelled'") == 100

"""The HTTP listener as an attacker sees it: forged and tampered unsubscribe tokens, tokens moved between
tenants, replays, oversized bodies, unknown paths and methods, and what /metrics gives away after traffic.

tests/component/test_unsubscribe.py covers the happy path (one-click, GET shows a page, one tampered
token, a POST without One-Click); this module covers the rest.
"""

from __future__ import annotations

import base64
import re
import secrets

import aiohttp
import pytest

from mtad.policy.feedback_token import BOUNCE, UNSUBSCRIBE, make_token
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour
from support.daemon import start_delivering, until, write_shaping
from support.queue import queue_messages
from support.smtp_client import RawSMTP, submit_one

ONE_CLICK = {"List-Unsubscribe": "One-Click"}
ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
IPV4 = re.compile(r"(?<![\d.])(\d{1,3}\.){3}\d{1,3}(?![\d.])")


async def queue_for(pool, tenant: str, address: str, list_id: str = "offers") -> int:
    """A queued marketing message of `tenant` to `address`; returns the recipient id."""
    (queue_id,) = await queue_messages(pool, [[address]], tenant=tenant, list_id=list_id)
    return await pool.fetchval(
        "SELECT r.id FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.queue_id = $1", queue_id
    )


async def snapshot(pool) -> tuple:
    """Everything an unsubscribe could change."""
    suppressions = await pool.fetch("SELECT tenant_id, address, list_id, reason FROM suppressions ORDER BY 1, 2, 3")
    states = await pool.fetch("SELECT id, state FROM recipients ORDER BY id")
    return [tuple(r) for r in suppressions], [tuple(r) for r in states]


def base_url(daemon) -> str:
    return f"http://127.0.0.1:{daemon.http.bound[0][1]}"


def tampered_tokens(key: bytes, tenant_id: int, recipient_id: int) -> dict[str, str]:
    good = make_token(key, UNSUBSCRIBE, tenant_id, recipient_id)
    raw = bytearray(base64.b32decode(good.upper() + "=" * (-len(good) % 8)))
    raw[-1] ^= 1
    flipped_mac = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
    raw = bytearray(base64.b32decode(good.upper() + "=" * (-len(good) % 8)))
    raw[11] ^= 1  # the recipient id, MAC left as it was: points at a neighbour
    flipped_id = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
    return {
        "random": "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(39)),
        "flipped-mac-bit": flipped_mac,
        "flipped-recipient-id": flipped_id,
        "bounce-purpose": make_token(key, BOUNCE, tenant_id, recipient_id),  # a VERP token is no unsubscribe
        "other-key": make_token(secrets.token_bytes(32), UNSUBSCRIBE, tenant_id, recipient_id),
        "truncated": good[:-1],
        "extended": good + "a",
        "space": good[:20] + "%20" + good[20:],
        "doubled": good + good,
        "huge": "a" * 5000,
        "dot-dot": "..%2F..%2Fmetrics",
        "nul": good[:10] + "%00" + good[10:],
        "not-base32": good[:-2] + "!!",
    }


async def test_forged_and_tampered_tokens_get_404_and_change_nothing(daemon, pool):
    acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    recipient = await queue_for(pool, "acme", "alice@a.example")
    await queue_for(pool, "acme", "bob@a.example")  # the neighbour a flipped id might reach
    before = await snapshot(pool)
    async with aiohttp.ClientSession() as http:
        for name, token in tampered_tokens(daemon.feedback_key, acme, recipient).items():
            url = f"{base_url(daemon)}/u/{token}"
            async with http.get(url) as page:
                assert page.status in (404, 414), (name, page.status)
                assert "alice" not in await page.text() and "a****" not in await page.text(), name
            async with http.post(url, data=ONE_CLICK) as refused:
                assert refused.status in (404, 414), (name, refused.status)
    assert await snapshot(pool) == before


async def test_a_token_of_one_tenant_cannot_touch_another_tenants_recipient(daemon, pool):
    acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    globex = await pool.fetchval("SELECT id FROM tenants WHERE name = 'globex'")
    acme_alice = await queue_for(pool, "acme", "alice@a.example")
    globex_alice = await queue_for(pool, "globex", "alice@a.example")
    before = await snapshot(pool)
    async with aiohttp.ClientSession() as http:
        # correctly signed, but pairing one tenant with the other's recipient: the store refuses the pair
        for tenant_id, recipient_id in ((globex, acme_alice), (acme, globex_alice)):
            token = make_token(daemon.feedback_key, UNSUBSCRIBE, tenant_id, recipient_id)
            async with http.post(f"{base_url(daemon)}/u/{token}", data={**ONE_CLICK, "scope": "all"}) as response:
                assert response.status == 404
        assert await snapshot(pool) == before
        token = make_token(daemon.feedback_key, UNSUBSCRIBE, acme, acme_alice)
        async with http.post(f"{base_url(daemon)}/u/{token}", data={**ONE_CLICK, "scope": "all"}) as response:
            assert response.status == 200
    suppressions, states = await snapshot(pool)
    assert suppressions == [(acme, "alice@a.example", "", "unsubscribed")]
    assert dict(states) == {acme_alice: "cancelled", globex_alice: "queued"}  # globex still mails alice


async def test_replaying_an_unsubscribe_changes_nothing_more(daemon, pool):
    acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    first = await queue_for(pool, "acme", "alice@a.example")
    url = f"{base_url(daemon)}/u/{make_token(daemon.feedback_key, UNSUBSCRIBE, acme, first)}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=ONE_CLICK) as response:
            assert response.status == 200
        after_first = await snapshot(pool)
        later = await queue_for(pool, "acme", "alice@a.example")  # queued after she left: stored as suppressed
        for _ in range(3):
            async with http.post(url, data=ONE_CLICK) as response:
                assert response.status == 200
    suppressions, states = await snapshot(pool)
    assert suppressions == after_first[0] and len(suppressions) == 1
    assert dict(states) == {first: "cancelled", later: "suppressed"}
    assert await pool.fetchval("SELECT count(*) FROM events WHERE kind = 'unsubscribed'") == 1  # one event, once


@pytest.mark.parametrize("size", [16 * 1024 + 1, 1024 * 1024])
async def test_oversized_request_bodies_get_413_and_change_nothing(daemon, pool, size):
    acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    recipient = await queue_for(pool, "acme", "alice@a.example")
    url = f"{base_url(daemon)}/u/{make_token(daemon.feedback_key, UNSUBSCRIBE, acme, recipient)}"
    before = await snapshot(pool)
    body = b"List-Unsubscribe=One-Click&padding=" + b"x" * size

    async def chunks():
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 413
        async with http.post(url, data=chunks(), headers=headers) as response:  # chunked: no Content-Length
            assert response.status == 413
    assert await snapshot(pool) == before


async def test_unknown_paths_get_404_and_wrong_methods_405(daemon):
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/admin", "/u", "/u/", "/metrics/x", "/api/tenants", "/debug", "/.env", "/u/a/b"):
            async with http.get(base_url(daemon) + path) as response:
                assert response.status == 404, path
        for method, path in (("PUT", "/u/abc"), ("DELETE", "/u/abc"), ("PATCH", "/u/abc"), ("POST", "/metrics"),
                             ("POST", "/healthz"), ("DELETE", "/readyz")):
            async with http.request(method, base_url(daemon) + path) as response:
                assert response.status == 405, (method, path)



async def test_metrics_and_health_pages_give_away_no_address_or_ip_after_traffic(db_url, tenants, pool, tmp_path):
    async with RemoteWorld(["mx", "bad"]) as world:
        world.add_domain("a.example", sink="mx")
        world.add_domain("b.example", sink="bad")
        world.sinks["bad"].behaviour = SinkBehaviour(recipient_replies={"b.example": "550 5.1.1 user unknown"})
        daemon = await start_delivering(db_url, tmp_path / "state", world, write_shaping(tmp_path / "shaping.toml"))
        try:
            port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
            for rcpt in ("alice@a.example", "bob@a.example", "carol@b.example"):
                await submit_one(port, rcpt)
            idle, _ = await RawSMTP.open(port)  # and a client that only connects
            await idle.close()
            assert await until(
                lambda: pool.fetchval("SELECT count(*) = 3 FROM recipients WHERE state IN ('delivered', 'bounced')"),
                timeout_s=30,
            )
            acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
            alice = await pool.fetchval("SELECT id FROM recipients WHERE address = 'alice@a.example'")
            async with aiohttp.ClientSession() as http:
                token = make_token(daemon.feedback_key, UNSUBSCRIBE, acme, alice)
                async with http.post(f"{base_url(daemon)}/u/{token}", data=ONE_CLICK) as response:
                    assert response.status == 200
                pages = {}
                for path in ("/metrics", "/healthz", "/readyz"):
                    async with http.get(base_url(daemon) + path) as response:
                        pages[path] = await response.text()
        finally:
            await daemon.stop()
    assert "mtad_" in pages["/metrics"]
    for path, text in pages.items():
        assert not ADDRESS.search(text), (path, ADDRESS.search(text).group(0))
        assert not IPV4.search(text), (path, IPV4.search(text).group(0))
        assert "a.example" not in text and "b.example" not in text, path  # no recipient domain as a label

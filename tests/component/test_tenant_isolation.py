"""Two tenants, acme and globex, mailing the same people: one can never see, cancel, suppress or unsubscribe
the other's mail or recipients, through SMTP, HTTP, the feedback listener or the operator commands' tenant
filters. Sending as another tenant's domain is covered in test_submission.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from mtad.model import Reply
from mtad.policy.feedback_token import UNSUBSCRIBE, make_token
from mtad.queue.store import QueueStore
from support.daemon import PASSWORD, daemon_document, ports_of, write_config
from support.queue import queue_messages
from support.smtp_client import RawSMTP

SHARED = ("alice@people.example", "bob@people.example")


def mtad(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def config(db_url, tmp_path):
    return write_config(tmp_path / "mtad.toml", daemon_document(db_url, tmp_path / "state"))


async def queue_for(pool, tenant: str, addresses=SHARED, list_id: str = "offers") -> str:
    (queue_id,) = await queue_messages(pool, [list(addresses)], tenant=tenant, list_id=list_id)
    return queue_id


async def states(pool) -> dict[tuple[str, str], str]:
    rows = await pool.fetch("SELECT t.name, r.address, r.state FROM recipients r JOIN tenants t ON t.id = r.tenant_id")
    return {(r["name"], r["address"]): r["state"] for r in rows}


async def test_queue_commands_with_a_tenant_filter_touch_only_that_tenant(tenants, pool, config):
    await queue_for(pool, "acme")
    await queue_for(pool, "globex")
    assert mtad(config, "queue", "pause", "--tenant", "acme").stdout.strip() == "pause: acme: 2 recipients"
    now = datetime.now(timezone.utc) + timedelta(hours=1)
    claims = await QueueStore(pool).claim("n", 10, 60, now)
    assert {c.tenant_id for c in claims} == {await pool.fetchval("SELECT id FROM tenants WHERE name = 'globex'")}
    busy = Reply(450, "4.2.0", "busy")
    await QueueStore(pool).defer("n", [c.recipient_id for c in claims], busy, now + timedelta(days=1), now)
    # acme has nothing deferred; globex's deferred recipients stay deferred
    assert "retry: acme: 0 recipients" in mtad(config, "queue", "retry", "--tenant", "acme").stdout
    assert "resume: acme: 2" in mtad(config, "queue", "resume", "--tenant", "acme").stdout
    assert "cancel: acme: 2 recipients" in mtad(config, "queue", "cancel", "--tenant", "acme").stdout
    assert await states(pool) == {
        ("acme", SHARED[0]): "cancelled", ("acme", SHARED[1]): "cancelled",
        ("globex", SHARED[0]): "deferred", ("globex", SHARED[1]): "deferred",
    }


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "cancel", "--tenant", "nosuch"),
        ("queue", "cancel", "--tenant", ""),
        ("queue", "cancel", "--domain", ""),
        ("queue", "cancel", "--queue-id", ""),
        ("queue", "pause", "--tenant", ""),
        ("queue", "pause", "--domain", ""),
        ("queue", "retry", "--tenant", "nosuch"),
        ("suppress", "add", "--tenant", "nosuch", SHARED[0]),
        ("suppress", "add", "--tenant", "", SHARED[0]),
    ],
    ids=lambda args: " ".join(a or "''" for a in args),
)
async def test_an_unknown_or_empty_filter_never_means_everybody(tenants, pool, config, args):
    await queue_for(pool, "acme")
    await queue_for(pool, "globex")
    before = await states(pool)
    result = mtad(config, *args)
    assert result.returncode != 0 or " 0 recipients" in result.stdout, (result.stdout, result.stderr)
    assert await states(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM suppressions") == 0
    assert await pool.fetchval("SELECT count(*) FROM queue_pauses") == 0


async def test_suppress_commands_act_on_one_tenants_list_only(tenants, pool, config):
    await queue_for(pool, "acme")
    await queue_for(pool, "globex")
    added = mtad(config, "suppress", "add", "--tenant", "acme", SHARED[0])
    assert "suppressed 1 addresses for acme; 1 pending recipients cancelled" in added.stdout
    assert mtad(config, "suppress", "list", "--tenant", "globex").stdout == ""
    assert "removed 0 suppressions" in mtad(config, "suppress", "remove", "--tenant", "globex", SHARED[0]).stdout
    assert mtad(config, "suppress", "export", "--tenant", "globex").stdout.splitlines()[1:] == []
    assert await states(pool) == {
        ("acme", SHARED[0]): "cancelled", ("acme", SHARED[1]): "queued",
        ("globex", SHARED[0]): "queued", ("globex", SHARED[1]): "queued",
    }
    # new mail: acme's is stored as suppressed, globex's to the same address is not
    await queue_for(pool, "acme", (SHARED[0],))
    await queue_for(pool, "globex", (SHARED[0],))
    rows = await pool.fetch(
        "SELECT t.name, r.state FROM recipients r JOIN tenants t ON t.id = r.tenant_id WHERE r.address = $1 "
        "ORDER BY r.id DESC LIMIT 2", SHARED[0]
    )
    assert {r["name"]: r["state"] for r in rows} == {"acme": "suppressed", "globex": "queued"}


async def test_events_with_a_tenant_filter_show_only_that_tenants_mail(tenants, pool, config):
    acme_message = await queue_for(pool, "acme")
    await queue_for(pool, "globex")
    assert mtad(config, "queue", "cancel", "--tenant", "acme").returncode == 0
    assert mtad(config, "queue", "cancel", "--tenant", "globex").returncode == 0
    by_recipient = json.loads(mtad(config, "events", "--recipient", SHARED[0], "--tenant", "globex", "--json").stdout)
    assert by_recipient and {e["tenant"] for e in by_recipient} == {"globex"}
    everybody = json.loads(mtad(config, "events", "--recipient", SHARED[0], "--json").stdout)
    assert {e["tenant"] for e in everybody} == {"acme", "globex"}  # without a filter, the operator sees both
    # a tenant filter with --message: globex's filter must not show acme's message
    filtered = mtad(config, "events", "--message", acme_message, "--tenant", "globex", "--json")
    assert filtered.returncode != 0 or json.loads(filtered.stdout) == [], filtered.stdout


async def test_unsubscribing_from_one_tenants_list_leaves_the_other_tenants_same_named_list(daemon, pool):
    acme = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    await queue_for(pool, "acme")
    await queue_for(pool, "globex")  # also a list called "offers"
    alice = await pool.fetchval(
        "SELECT r.id FROM recipients r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = 'acme' AND address = $1",
        SHARED[0],
    )
    url = f"http://127.0.0.1:{daemon.http.bound[0][1]}/u/{make_token(daemon.feedback_key, UNSUBSCRIBE, acme, alice)}"
    async with aiohttp.ClientSession() as http, http.post(url, data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    assert await states(pool) == {
        ("acme", SHARED[0]): "cancelled", ("acme", SHARED[1]): "queued",
        ("globex", SHARED[0]): "queued", ("globex", SHARED[1]): "queued",
    }
    rows = await pool.fetch("SELECT tenant_id, address, list_id FROM suppressions")
    assert [tuple(r) for r in rows] == [(acme, SHARED[0], "offers")]


async def test_one_tenant_cannot_log_in_on_behalf_of_another(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.command("EHLO client.test")
    await client.starttls()
    await client.command("EHLO client.test")
    token = base64.b64encode(f"globex\0acme\0{PASSWORD}".encode()).decode()  # authzid globex, acme's password
    code, text = await client.command(f"AUTH PLAIN {token}")
    assert (code, text[4:9]) == (535, "5.7.8")
    code, text = await client.command("MAIL FROM:<news@globex.example>")
    assert (code, text[4:9]) == (530, "5.7.0")
    await client.close()
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0

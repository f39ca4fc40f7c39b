"""The daemon as operators run it: a real `mtad run` process, killed, stopped, reloaded, with its database lost."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import aiohttp
import pytest

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import migrate
from support.daemon import PASSWORD, DaemonProcess, add_test_tenants, daemon_document, ports_of, start_in_process, write_config
from support.smtp_client import RawSMTP

MESSAGE = b"From: news@acme.example\r\nSubject: kept\r\n\r\nSECRET-BODY-MARKER\r\n"


async def submit(port: int, recipients: list[str]) -> tuple[int, str]:
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250
    for rcpt in recipients:
        assert (await client.command(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    reply = await client.command(MESSAGE + b".")
    await client.command("QUIT")
    await client.close()
    return reply


@pytest.fixture
def daemon_process(db_url, tenants, tmp_path):
    document = daemon_document(db_url, tmp_path / "state", max_recipients=10)
    process = DaemonProcess(write_config(tmp_path / "mtad.toml", document))
    yield process
    process.kill()


async def test_a_message_acknowledged_with_250_survives_sigkill_and_restart(daemon_process, pool):
    daemon_process.start()
    code, text = await submit(daemon_process.ports[0], ["a@example.net", "b@example.org"])
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]
    daemon_process.kill()  # SIGKILL: no shutdown code runs
    daemon_process.start()
    rows = await pool.fetch(
        "SELECT r.address, r.state FROM recipients r JOIN messages m ON m.id = r.message_id "
        "WHERE m.queue_id = $1 ORDER BY r.address",
        queue_id,
    )
    assert [tuple(r) for r in rows] == [("a@example.net", "queued"), ("b@example.org", "queued")]
    code, _ = await submit(daemon_process.ports[0], ["c@example.net"])  # and the restarted daemon works
    assert code == 250


async def test_sigterm_lets_the_transaction_in_flight_finish_then_stops_cleanly(db_url, tenants, tmp_path, pool):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    process = DaemonProcess(
        write_config(tmp_path / "mtad.toml", daemon_document(db_url, tmp_path / "state")),
        env={"NOTIFY_SOCKET": str(notify_path)},
    )
    try:
        process.start()
        assert notify.recv(4096).startswith(b"READY=1")
        busy, _ = await RawSMTP.open(process.ports[0])
        await busy.authenticated("acme", PASSWORD)
        idle, _ = await RawSMTP.open(process.ports[0])
        await busy.command("MAIL FROM:<news@acme.example>")
        await busy.command("RCPT TO:<x@example.net>")
        assert (await busy.command("DATA"))[0] == 354
        await busy.send(MESSAGE[:20])  # half a message is on the wire when SIGTERM arrives
        process.signal(signal.SIGTERM)
        assert (await idle.reply())[0] == 421  # an idle session is told at once
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", process.ports[0])  # no new connections
        await busy.send(MESSAGE[20:] + b".\r\n")
        code, text = await busy.reply()
        assert code == 250, text  # the transaction in flight completes
        assert (await busy.reply())[0] == 421  # then the session is closed
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert notify.recv(4096).startswith(b"STOPPING=1")
        assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    finally:
        process.kill()
        notify.close()


async def test_sighup_reloads_limits_without_dropping_connections(db_url, tenants, tmp_path):
    config = tmp_path / "mtad.toml"
    process = DaemonProcess(write_config(config, daemon_document(db_url, tmp_path / "state", max_recipients=3)))
    try:
        process.start()
        client, _ = await RawSMTP.open(process.ports[0])
        await client.authenticated("acme", PASSWORD)
        write_config(config, daemon_document(db_url, tmp_path / "state", max_recipients=1))
        process.signal(signal.SIGHUP)
        for _ in range(200):
            if any(e.get("event") == "config.reloaded" for e in process.events()):
                break
            await asyncio.sleep(0.05)
        assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250  # same connection, still there
        assert (await client.command("RCPT TO:<a@example.net>"))[0] == 250
        code, text = await client.command("RCPT TO:<b@example.net>")
        assert (code, text[4:9]) == (452, "4.5.3")  # the new limit applies
        await client.close()
    finally:
        process.kill()


async def test_logs_are_one_json_event_per_line_without_secrets_and_with_masked_ips(daemon_process):
    daemon_process.start()
    client, _ = await RawSMTP.open(daemon_process.ports[0])
    await client.command("EHLO x")
    await client.starttls()
    await client.command("EHLO x")
    assert (await client.login("acme", "a wrong guess"))[0] == 535
    await client.close()
    assert (await submit(daemon_process.ports[0], ["r@example.net"]))[0] == 250
    daemon_process.signal(signal.SIGTERM)
    daemon_process.wait()
    raw = daemon_process.log_path.read_text()
    assert "SECRET-BODY-MARKER" not in raw
    assert PASSWORD not in raw and "a wrong guess" not in raw
    events = [json.loads(line) for line in raw.splitlines()]  # every line is one JSON object
    about_clients = [json.dumps(e) for e in events if e["event"] != "daemon.ready"]  # ready names our listeners
    assert not [line for line in about_clients if "127.0.0.1" in line]
    queued = [e for e in events if e["event"] == "submission.queued"]
    assert len(queued) == 1 and queued[0]["client"] == "127.0.0.0" and queued[0]["recipients"] == 1
    assert [e["client"] for e in events if e["event"] == "auth.failed"] == ["127.0.0.0"]


async def test_database_down_gives_451_and_nothing_is_half_written(tmp_path):
    root = tmp_path.parent / f"{tmp_path.name}-pg"
    root.mkdir(mode=0o755)
    root.parent.chmod(0o755)
    # durable: with synchronous_commit off an immediate stop could lose the tenants this test just added
    cluster = EmbeddedPostgres(root / "pg", durable=True)
    cluster.start()
    import asyncpg

    try:
        pool = await asyncpg.create_pool(cluster.url(), min_size=1, max_size=2)
        async with pool.acquire() as conn:
            await migrate(conn)
        await add_test_tenants(pool)
        await pool.close()
        daemon = await start_in_process(cluster.url(), tmp_path / "state")
        try:
            port, _ = ports_of(daemon)
            client, _ = await RawSMTP.open(port)
            await client.authenticated("acme", PASSWORD)
            await asyncio.to_thread(cluster.stop, "immediate")
            ready_url = "http://127.0.0.1:%d/readyz" % daemon.http.bound[0][1]
            async with aiohttp.ClientSession() as http, http.get(ready_url) as ready:
                assert ready.status == 503 and "database unreachable" in await ready.text()
            code, text = await client.command("MAIL FROM:<news@acme.example>")
            assert code == 250, text
            await client.command("RCPT TO:<a@example.net>")
            await client.command("RCPT TO:<b@example.net>")
            assert (await client.command("DATA"))[0] == 354
            code, text = await client.command(MESSAGE + b".")
            assert (code, text[4:9]) == (451, "4.3.0")  # never a 250 for mail that is not stored
            await asyncio.to_thread(cluster.start)
            check = await asyncpg.connect(cluster.url())
            assert await check.fetchval("SELECT count(*) FROM messages") == 0
            assert await check.fetchval("SELECT count(*) FROM recipients") == 0
            for _ in range(50):  # the daemon's pool recovers by itself: the client retries and succeeds
                code, text = await client.command("MAIL FROM:<news@acme.example>")
                await client.command("RCPT TO:<a@example.net>")
                await client.command("DATA")
                code, text = await client.command(MESSAGE + b".")
                if code == 250:
                    break
                await asyncio.sleep(0.2)
            assert code == 250, text
            assert await check.fetchval("SELECT count(*) FROM recipients") == 1
            async with aiohttp.ClientSession() as http, http.get(ready_url) as ready:
                assert ready.status == 200
            await check.close()
            await client.close()
        finally:
            await daemon.stop()
    finally:
        cluster.stop("immediate")


async def test_a_database_too_slow_to_store_gets_451_within_the_command_timeout_and_nothing_half_written(
    db_url, tenants, pool, tmp_path
):
    # Another session holds the queue tables locked: PostgreSQL is up but cannot store anything in time.
    from mtad.app import Daemon
    from mtad.config import parse_settings

    document = daemon_document(db_url, tmp_path / "state")
    document["database"] = {**document["database"], "command_timeout": "1s"}
    daemon = Daemon(parse_settings(document, {}), None)
    await daemon.start()
    try:
        port, _ = ports_of(daemon)
        client, _ = await RawSMTP.open(port)
        await client.authenticated("acme", PASSWORD)
        async with pool.acquire() as locker, locker.transaction():
            await locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            await client.command("MAIL FROM:<news@acme.example>")
            await client.command("RCPT TO:<slow@example.net>")
            assert (await client.command("DATA"))[0] == 354
            started = asyncio.get_running_loop().time()
            code, text = await client.command(MESSAGE + b".")
            waited = asyncio.get_running_loop().time() - started
        assert (code, text[4:9]) == (451, "4.3.0"), text  # never a 250 for mail that is not stored
        assert waited < 10  # bounded by database.command_timeout, not by the lock
        assert await pool.fetchval("SELECT count(*) FROM messages") == 0
        assert await pool.fetchval("SELECT count(*) FROM recipients") == 0
        await client.command("MAIL FROM:<news@acme.example>")  # the lock is gone: the same session stores
        await client.command("RCPT TO:<slow@example.net>")
        await client.command("DATA")
        code, text = await client.command(MESSAGE + b".")
        assert code == 250, text
        await client.close()
    finally:
        await daemon.stop()

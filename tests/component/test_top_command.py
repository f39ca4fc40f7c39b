"""`mtad top` as an operator runs it, against a real database that work is flowing through."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
from datetime import datetime, timedelta, timezone

import pytest

from mtad.model import EnvelopeRecipient, Submission
from mtad.queue.store import QueueStore
from mtad.tenants.store import TenantStore

from support.daemon import daemon_document, write_config

# `top` is registered in mtad.cli.main separately; this runs mtad's own main() with a parser holding just `top`,
# so config loading and the exit codes are mtad's.
RUN_TOP = """
import argparse, sys
from mtad.cli import main, top

def build_parser():
    parser = argparse.ArgumentParser(prog="mtad")
    parser.add_argument("--config")
    top.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser

main.build_parser = build_parser
sys.exit(main.main(sys.argv[1:]))
"""

LONG_ERROR = (
    "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints " * 2
)


def top_command(config, *args: str) -> list[str]:
    return [sys.executable, "-c", RUN_TOP, "--config", str(config), "top", *args]


@pytest.fixture
def config(db_url, tmp_path):
    return write_config(tmp_path / "mtad.toml", daemon_document(db_url, tmp_path / "state"))


@pytest.fixture
async def busy_database(pool):
    """A queue with 3 queued, 1 active and 1 deferred recipient, two nodes reporting, one of them a dead site."""
    tenant = await TenantStore(pool).insert_tenant("acme", "x")
    store = QueueStore(pool)
    now = datetime.now(timezone.utc)
    messages = {"Q1": ["a@gmail.com", "b@gmail.com", "c@outlook.com"], "Q2": ["d@x.example", "e@x.example"]}
    for queue_id, recipients in messages.items():
        await store.insert_submission(
            Submission(
                queue_id=queue_id,
                tenant_id=tenant,
                mail_from="news@acme.example",
                recipients=tuple(EnvelopeRecipient(r, r.split("@")[1]) for r in recipients),
                body=b"From: news@acme.example\r\n\r\nhello\r\n",
                client_ip="192.0.2.0",
                received_at=now - timedelta(minutes=5),
            )
        )
    await pool.execute("UPDATE recipients SET state = 'deferred' WHERE address = 'c@outlook.com'")
    await pool.execute(
        "UPDATE recipients SET state = 'active', lease_owner = 'node-a',"
        " lease_expires_at = now() + interval '5 minutes' WHERE address = 'a@gmail.com'"
    )
    site_status = """
        INSERT INTO site_status (node, site, provider, health, concurrency, in_flight, pending, rate_scale, dead_until,
                                 last_error, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    """
    rows = [
        ("node-a", "google", "google", "healthy", 20, 12, 300, 1.0, None, None, now),
        ("node-b", "google", "google", "healthy", 10, 5, 100, 1.0, None, None, now),
        ("node-a", "outlook", "microsoft", "dead", 1, 0, 40, 0.5, now + timedelta(minutes=3), LONG_ERROR, now),
        ("node-b", "x.example", None, "backoff", 2, 1, 7, 0.25, None, "452 4.2.2 mailbox full", now),
        # a node that stopped reporting ten minutes ago: not shown, not counted
        ("node-gone", "stale.example", None, "dead", 1, 0, 999, 0.1, now, "stale error", now - timedelta(minutes=10)),
    ]
    for row in rows:
        await pool.execute(site_status, *row)
    return tenant


async def keep_delivering(pool, tenant: int, stop: asyncio.Event) -> int:
    """Mail flowing through while top watches: one message received and delivered every 20 ms, each in one
    transaction so the queue counts top sees stay those of busy_database."""
    sent = 0
    while not stop.is_set():
        async with pool.acquire() as conn, conn.transaction():
            message = await conn.fetchval(
                "INSERT INTO messages (queue_id, tenant_id, mail_from, size_bytes, received_at, body)"
                " VALUES ($1, $2, 'news@acme.example', 5, now(), 'hello') RETURNING id",
                f"FLOW{sent}",
                tenant,
            )
            recipient = await conn.fetchval(
                "INSERT INTO recipients (message_id, tenant_id, address, domain, state, queued_at, next_attempt_at,"
                " updated_at) VALUES ($1, $2, 'z@gmail.com', 'gmail.com', 'delivered', now(), now(), now())"
                " RETURNING id",
                message,
                tenant,
            )
            await conn.execute(
                "INSERT INTO events (at, kind, tenant_id, message_id, recipient_id, code) VALUES"
                " (clock_timestamp(), 'delivered', $1, $2, $3, 250), (clock_timestamp(), 'deferred', $1, $2, $3, 451)",
                tenant,
                message,
                recipient,
            )
        sent += 1
        await asyncio.sleep(0.02)
    return sent


async def run(command: list[str], timeout_s: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    return process.returncode, out.decode(), err.decode()


async def run_while_mail_flows(pool, tenant: int, command: list[str], timeout_s: float = 60) -> tuple[int, str, str]:
    stop = asyncio.Event()
    writer = asyncio.create_task(keep_delivering(pool, tenant, stop))
    try:
        return await run(command, timeout_s)
    finally:
        stop.set()
        assert await writer > 0


async def test_once_shows_rates_queue_and_troubled_sites(config, pool, busy_database):
    code, out, err = await run_while_mail_flows(pool, busy_database, top_command(config, "--once", "--interval", "1.5"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("mtad top ") and "nodes reporting 2" in lines[0] and "mtad_test_" in lines[0]
    assert re.search(r"queue  queued 3  active 1  deferred 1  oldest pending 5m \d\ds", out), out
    # rates: mail arrived and was delivered during the interval (a message every 20 ms: far from zero)
    msgs_in = float(re.search(r"^in +([\d.]+) msg/s", out, re.M).group(1))
    delivered = float(re.search(r"^out +delivered ([\d.]+)/s  deferred ([\d.]+)/s  bounced 0/s", out, re.M).group(1))
    assert msgs_in > 2 and delivered > 2, out
    # the dead site first, with its node, window, rate scale, dead-until and its last error cut to one short line
    troubled = out[out.index("troubled sites (2)"):].splitlines()
    dead = r"\s+outlook\s+node-a\s+dead\s+1\s+x0\.50\s+40\s+[23]m \d\ds\s+421 4\.7\.0 \[TSS04\]"
    assert re.match(dead, troubled[2]), out
    assert troubled[2].endswith("…") and LONG_ERROR[:200] not in out
    assert re.match(r"\s+x\.example\s+node-b\s+backoff\s+2\s+x0\.25\s+7\s+-\s+452 4\.2\.2 mailbox full$", troubled[3])
    # busiest sites add up the nodes; the stopped node is nowhere
    busiest = out[out.index("busiest sites (3 reporting)"):].splitlines()
    assert re.match(r"\s+google\s+google\s+2\s+30\s+17\s+400$", busiest[2]), out
    assert "stale" not in out and "node-gone" not in out


async def test_json_is_one_snapshot_for_scripts(config, pool, busy_database):
    command = top_command(config, "--json", "--interval", "1", "--cap", "3")
    code, out, err = await run_while_mail_flows(pool, busy_database, command)
    assert code == 0, err
    frame = json.loads(out)
    assert frame["queue"] == {
        "queued": {"count": 3, "capped": True},  # 3 counted with --cap 3: "at least 3"
        "active": {"count": 1, "capped": False},
        "deferred": {"count": 1, "capped": False},
    }
    assert frame["nodes"] == 2 and frame["sites"] == 3 and frame["troubled_sites"] == 2
    assert 290 < frame["oldest_pending_age_s"] < 400
    rates = frame["rates"]
    assert 0.8 < rates["elapsed_s"] < 5
    assert rates["messages_in_per_s"] > 2 and rates["recipients_in_per_s"] > 2
    assert rates["events_per_s"]["delivered"] > 2 and rates["events_per_s"]["bounced"] == 0
    assert [(s["site"], s["node"], s["health"]) for s in frame["troubled"]] == [
        ("outlook", "node-a", "dead"),
        ("x.example", "node-b", "backoff"),
    ]
    assert frame["troubled"][0]["last_error"] == LONG_ERROR  # JSON keeps the whole error
    assert frame["busiest"][0] == {
        "site": "google", "provider": "google", "nodes": 2, "window": 30, "in_flight": 17, "pending": 400,
    }


async def test_capped_count_in_text(config, busy_database):
    code, out, err = await run(top_command(config, "--once", "--interval", "0.2", "--cap", "2"))
    assert code == 0, err
    assert "queue  queued 2+  active 1  deferred 1" in out


async def test_top_never_writes(config, pool, busy_database):
    """The snapshot transaction and the session default are read-only: a write there fails."""
    from mtad.cli import top

    conn = await pool.acquire()
    try:
        await top.read_only(conn)
        snapshot = await top.take_snapshot(conn, None)
        assert snapshot.queue == {"queued": 3, "active": 1, "deferred": 1}
        with pytest.raises(Exception, match="read-only transaction"):
            await conn.execute("DELETE FROM site_status")
    finally:
        await conn.execute("RESET default_transaction_read_only")
        await pool.release(conn)
    assert await pool.fetchval("SELECT count(*) FROM site_status") == 5


async def test_a_database_that_is_not_there_is_one_line_and_exit_1(tmp_path):
    document = daemon_document("postgresql://nobody@127.0.0.1:1/none", tmp_path / "state")
    document["database"]["connect_timeout"] = "2s"
    config = write_config(tmp_path / "down.toml", document)
    code, out, err = await run(top_command(config, "--once", "--interval", "0.2"))
    assert code == 1 and err.startswith("mtad: database unavailable:"), err
    assert "Traceback" not in err and out == ""


async def read_until(fd: int, pattern: bytes, timeout_s: float) -> bytes:
    loop = asyncio.get_running_loop()
    seen = b""
    deadline = loop.time() + timeout_s
    while pattern not in seen:
        if loop.time() > deadline:
            raise AssertionError(f"{pattern!r} not seen in {seen[-2000:]!r}")
        await asyncio.sleep(0.05)
        with contextlib.suppress(BlockingIOError, OSError):
            seen += os.read(fd, 65536)
    return seen


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
async def test_live_view_refreshes_and_ctrl_c_exits_0(config, busy_database, terminal):
    if terminal:  # a terminal of 140 x 40: the rich live view on the alternate screen
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    else:  # not a terminal: one plain frame after another
        master, slave = os.pipe()
    os.set_blocking(master, False)
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    process = await asyncio.create_subprocess_exec(
        *top_command(config, "--interval", "0.3"), stdout=slave, stderr=asyncio.subprocess.PIPE, env=env
    )
    os.close(slave)
    try:
        seen = await read_until(master, b"msg/s", 30)  # the second frame, the first with rates
        assert b"troubled sites (2)" in seen and b"outlook" in seen
        if not terminal:
            assert seen.count(b"mtad top ") >= 2 and b"rates after the next refresh" in seen
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 30)
        err = (await process.stderr.read()).decode()
        assert code == 0, err
        assert "Traceback" not in err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(master)


@pytest.mark.parametrize("option", [["--interval", "0"], ["--interval", "soon"], ["--cap", "0"], ["--sites", "-1"]])
async def test_options_out_of_range_are_refused(config, option):
    code, out, err = await run(top_command(config, "--once", *option))
    assert code == 2 and "error: argument" in err

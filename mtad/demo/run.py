"""The demo scenario: a private world on loopback, a burst of mail through it, and what became of every message.

What runs, all in this process and all on loopback:
- a fresh PostgreSQL cluster in a temporary directory (non-durable settings: it is thrown away afterwards);
- a DNS server and four simulated provider MX servers (`mtad.simulate`):
    inbox.example              healthy, accepts everything
    bigmail.example, bigmail-hosted.example  one provider (MX *.bigmail-mx.example, rolled up by shaping.toml)
                               that answers 421 above 2 concurrent sessions
    greymail.example           greylists: 450 4.2.0 for the first attempt of each recipient, then accepts
    oldisp.example             a third of its users are gone: 550 5.1.1
- the daemon (`mtad.app.Daemon`) with a generated config: DKIM (RSA-2048), the feedback listener with a bounce
  domain, retries after 2-4 s, the HTTP listener (unsubscribe links, /metrics).

Then: N messages (a quarter transactional) are submitted over SMTP (STARTTLS + AUTH, several parallel
sessions) to a pool of N/4 addresses, so every address gets several messages; a few recipients click the
one-click List-Unsubscribe link of a delivered copy while mail still flows; a few DSNs come back to VERP
addresses; the demo waits until the queue is empty and summarises from the database. Everything it started is
stopped and the temporary directory removed, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import aiohttp
import aiosmtplib

from mtad.app import Daemon
from mtad.config import parse_settings
from mtad.db.embedded import EmbeddedPostgres
from mtad.sign.keys import generate_private_key, write_key
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour
from mtad.tenants.passwords import hash_password
from mtad.tenants.store import TenantStore

TENANT = "demo"
SENDING_DOMAIN = "demo.example"
BOUNCE_DOMAIN = "bounces.demo.example"
LIST_NAME = "newsletter"
DRAIN_TIMEOUT_S = 60.0
SUBMIT_TIMEOUT_S = 30.0  # one SMTP command
STATUS_INTERVAL_S = 0.5
HANDOVER_S = 0.25  # see deliveries_after_unsubscribe
STEP_TIMEOUT_S = 40.0  # each step of stopping (the daemon alone may take shutdown_grace twice)
PENDING_STATES = ("queued", "active", "deferred")

# (domain, sink, MX host, share of the address pool)
DOMAINS = [
    ("inbox.example", "mx-healthy", "mx.inbox.example", 0.55),
    ("bigmail.example", "mx-throttling", "mx1.bigmail-mx.example", 0.10),  # two sessions at most: the slow lane
    ("bigmail-hosted.example", "mx-throttling", "mx1.bigmail-mx.example", 0.05),
    ("greymail.example", "mx-greylisting", "mx.greymail.example", 0.15),
    ("oldisp.example", "mx-unknown-users", "mx.oldisp.example", 0.15),
]
UNKNOWN_USER = "550 5.1.1 <{address}>: Recipient address rejected: User unknown in local recipient table"

SHAPING = """\
# Written by `mtad demo`.
[default]
connection_limit = 8
initial_destination_concurrency = 4
max_message_rate = "1000/s"
max_connection_rate = "50/s"
max_deliveries_per_connection = 200
max_recipients_per_transaction = 50
idle_timeout = "5s"
tls = "opportunistic"
dead_after_failures = 5
dead_for = "1s"
backoff_for = "2s"

[provider.bigmail]
match_mx_suffix = [".bigmail-mx.example"]
connection_limit = 6
initial_destination_concurrency = 4
max_message_rate = "500/s"
backoff_for = "2s"
"""

DSN_TEMPLATE = """\
Return-Path: <>
Date: {date}
From: MAILER-DAEMON@mx.inbox.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="{boundary}"
Content-Transfer-Encoding: 8bit
Message-Id: <{boundary}@mx.inbox.example>

This is a MIME-encapsulated message.

--{boundary}
Content-Description: Notification
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

This is the mail system at host mx.inbox.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{rcpt}>: host mailstore.inbox.example[192.0.2.30] said: 550 5.1.1
    <{rcpt}>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

--{boundary}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.inbox.example
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: {date}

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: failed
Status: 5.1.1
Remote-MTA: dns; mailstore.inbox.example
Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address
    rejected: User unknown in virtual mailbox table

--{boundary}
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{headers}
--{boundary}--
"""

log = logging.getLogger("mtad.demo")


@dataclass
class DemoOptions:
    messages: int = 2000
    clients: int = 8
    unsubscribes: int = 20
    dsns: int = 5
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    seed: int = 2026


@dataclass
class Status:
    """What the progress display shows; updated by the scenario, read by the display."""

    total: int
    submitted: int = 0
    finished: int = 0  # recipients no longer pending (delivered, bounced, suppressed, cancelled, expired)
    delivered: int = 0
    deferred_now: int = 0
    unsubscribed: int = 0
    dsns_sent: int = 0
    phase: str = "starting"
    notes: list[str] = field(default_factory=list)


# ---- the world ----------------------------------------------------------------------------------------------


def address_pool(size: int, rng: random.Random) -> tuple[list[str], set[str]]:
    """`size` recipient addresses spread over the demo domains (shuffled), and those that do not exist."""
    addresses, unknown = [], set()
    for domain, sink, _, share in DOMAINS:
        count = max(2, round(size * share))
        for i in range(count):
            address = f"user{i:05d}@{domain}"
            addresses.append(address)
            if sink == "mx-unknown-users" and i % 3 == 0:
                unknown.add(address)
    rng.shuffle(addresses)
    return addresses, unknown


def build_world(unknown: set[str]) -> RemoteWorld:
    behaviours = {
        "mx-healthy": SinkBehaviour(),
        "mx-throttling": SinkBehaviour(max_concurrent_sessions=2),
        "mx-greylisting": SinkBehaviour(greylist=True),
        "mx-unknown-users": SinkBehaviour(recipient_replies={a: UNKNOWN_USER.format(address=a) for a in unknown}),
    }
    hostnames = {}
    for _, sink, mx_host, _ in DOMAINS:
        hostnames[sink] = mx_host
    world = RemoteWorld(behaviours, hostnames=hostnames)
    return world


def publish_domains(world: RemoteWorld) -> None:
    for domain, sink, mx_host, _ in DOMAINS:
        world.add_domain(domain, sink=sink, mx_host=mx_host)


def daemon_document(root: Path, db_url: str, world: RemoteWorld) -> dict:
    return {
        "hostname": "mtad.demo.example",
        "state_dir": str(root / "state"),
        "shutdown_grace": "5s",
        "database": {"url": db_url, "auto_migrate": True, "pool_min_size": 2, "pool_max_size": 10},
        "submission": {"listen": ["127.0.0.1:0"], "implicit_tls_listen": ["127.0.0.1:0"]},
        "queue": {"reclaim_interval": "2s", "poll_interval": "200ms", "lease": "30s", "gauge_interval": "1s"},
        "delivery": {
            "nameservers": ["127.0.0.1"],
            "dns_port": world.dns.port,
            "dns_timeout": "2s",
            "smtp_port": world.smtp_port,
            "shaping_file": str(root / "shaping.toml"),
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "connect_timeout": "5s",
            "command_timeout": "10s",
            "data_timeout": "10s",
        },
        "feedback": {"listen": ["127.0.0.1:0"], "bounce_domain": BOUNCE_DOMAIN},
        "http": {"listen": ["127.0.0.1:0"]},
    }


# ---- the traffic --------------------------------------------------------------------------------------------


def message_bytes(index: int, rcpt: str, transactional: bool) -> bytes:
    if transactional:
        headers = (
            f"From: Demo Shop <orders@{SENDING_DOMAIN}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: Your order #{100000 + index} has shipped\r\nX-Mtad-Class: transactional\r\n"
        )
        body = f"Hello,\r\n\r\nyour order #{100000 + index} is on its way.\r\n"
    else:
        headers = (
            f"From: Demo Shop <news@{SENDING_DOMAIN}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: This week's offers ({index})\r\nX-Mtad-List: {LIST_NAME}\r\n"
        )
        body = "Hello,\r\n\r\n" + "Everything is 20% off this week, and shipping is free.\r\n" * 30
    headers += "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    return (headers + "\r\n" + body).encode()


async def submit_all(
    port: int, password: str, plan: list[tuple[int, str, bool]], clients: int, status: Status, opened: list
) -> None:
    """`clients` parallel sessions (STARTTLS, AUTH) share the plan; every client is put in `opened` at once, so
    that whoever stops the demo can close connections a cancelled client left behind."""
    queue: asyncio.Queue[tuple[int, str, bool]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, validate_certs=False,
                               timeout=SUBMIT_TIMEOUT_S)
        opened.append(smtp)
        try:
            await smtp.connect()
            await smtp.login(TENANT, password)
            while True:
                try:
                    index, rcpt, transactional = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                sender = f"{'orders' if transactional else 'news'}@{SENDING_DOMAIN}"
                await smtp.sendmail(sender, [rcpt], message_bytes(index, rcpt, transactional))
                status.submitted += 1
        except BaseException:
            smtp.close()  # cancelled or failed mid-command: no polite QUIT
            raise
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            smtp.close()

    await asyncio.gather(*(client() for _ in range(clients)))


def unsubscribe_link(data: bytes) -> str | None:
    match = re.search(rb"^List-Unsubscribe:[ \t]*(.*(?:\r\n[ \t].*)*)", data, re.MULTILINE)
    if not match:
        return None
    link = re.search(rb"<(https?://[^>]+)>", match.group(1))
    return link.group(1).decode() if link else None


async def click_unsubscribes(
    world: RemoteWorld, wanted: int, status: Status, done: asyncio.Event, confirmed: dict[str, float]
) -> None:
    """Recipients at the healthy provider press the mail client's Unsubscribe button (RFC 8058 one-click).

    `confirmed` gets, per address, the moment (time.monotonic()) its 200 arrived."""
    sink = world.sinks["mx-healthy"]
    seen = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while len(confirmed) < wanted and not done.is_set():
            for message in sink.messages[seen:]:
                seen += 1
                rcpt = message.rcpt_tos[0].lower()
                url = unsubscribe_link(message.data)
                if url is None or rcpt in confirmed or len(confirmed) >= wanted:
                    continue
                async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as response:
                    if response.status == 200:
                        confirmed[rcpt] = time.monotonic()
                        status.unsubscribed = len(confirmed)
            await asyncio.sleep(0.1)


def deliveries_after_unsubscribe(world: RemoteWorld, confirmed: dict[str, float]) -> int:
    """Marketing copies whose MAIL FROM reached a provider after the recipient's unsubscribe was confirmed.

    Seen from the receiving side, as a recipient would. A copy whose last check ("still wanted?") passed just
    before the click may be on the wire while the 200 travels back; HANDOVER_S covers that hand-over on this
    one busy event loop. Anything later is a real violation."""
    count = 0
    for sink in world.sinks.values():
        for message in sink.messages:
            at = confirmed.get(message.rcpt_tos[0].lower())
            if at is not None and message.mail_at > at + HANDOVER_S and unsubscribe_link(message.data):
                count += 1
    return count


async def send_dsns(world: RemoteWorld, feedback_port: int, wanted: int, status: Status, done: asyncio.Event,
                    avoid: Callable[[str], bool]) -> None:
    """A few mailboxes at the healthy provider turn out gone after acceptance: their DSNs come back to VERP."""
    sink = world.sinks["mx-healthy"]
    sent: set[str] = set()
    seen = 0
    while len(sent) < wanted and not done.is_set():
        await asyncio.sleep(0.2)
        for message in sink.messages[seen:]:
            seen += 1
            rcpt = message.rcpt_tos[0].lower()
            if rcpt in sent or avoid(rcpt) or not message.mail_from.endswith("@" + BOUNCE_DOMAIN):
                continue
            if len(sent) >= wanted:
                break
            headers = message.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
            report = DSN_TEMPLATE.format(
                date=format_datetime(datetime.now(timezone.utc)),
                verp=message.mail_from,
                rcpt=rcpt,
                boundary=f"demo{len(sent)}.{int(time.time())}/mx.inbox.example",
                headers=headers.replace("\r\n", "\n"),
            ).replace("\n", "\r\n")
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=feedback_port, start_tls=False, timeout=15)
            await smtp.connect()
            try:
                await smtp.sendmail("", [message.mail_from], report.encode())
            finally:
                smtp.close()
            sent.add(rcpt)
            status.dsns_sent = len(sent)


def provider_refusals(world: RemoteWorld) -> dict[str, int]:
    """What the simulated providers refused, as they saw it: {"mx-throttling: 421 at CONNECT": n, ...}."""
    counts: dict[str, int] = {}
    for name, sink in world.sinks.items():
        for rejection in sink.rejections:
            key = f"{name}: {rejection.reply[:3]} at {rejection.stage}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ---- observing ----------------------------------------------------------------------------------------------


async def refresh_status(pool, tenant_id: int, status: Status) -> int:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM recipients WHERE tenant_id = $1 GROUP BY state", tenant_id
    )
    counts = {row["state"]: row["n"] for row in rows}
    pending = sum(counts.get(state, 0) for state in PENDING_STATES)
    status.finished = sum(counts.values()) - pending
    status.delivered = counts.get("delivered", 0)
    status.deferred_now = counts.get("deferred", 0)
    return pending


SUMMARY_SQL = {
    "delivered": "SELECT count(*) FROM recipients WHERE tenant_id = $1 AND state = 'delivered'",
    "deferred_then_delivered": (
        "SELECT count(*) FROM recipients WHERE tenant_id = $1 AND state = 'delivered' AND attempts > 1"
    ),
    "suppressed": "SELECT count(*) FROM recipients WHERE tenant_id = $1 AND state = 'suppressed'",
    "unsubscribed": "SELECT count(*) FROM suppressions WHERE tenant_id = $1 AND reason = 'unsubscribed'",
    "still_pending": (
        "SELECT count(*) FROM recipients WHERE tenant_id = $1 AND state IN ('queued', 'active', 'deferred')"
    ),
}


async def summarise(pool, tenant_id: int, submitted: int, elapsed_s: float) -> dict:
    summary: dict = {}
    for key, sql in SUMMARY_SQL.items():
        summary[key] = await pool.fetchval(sql, tenant_id)
    rows = await pool.fetch(
        "SELECT coalesce(category, 'other') AS category, count(*) AS n FROM events "
        "WHERE tenant_id = $1 AND kind IN ('bounced', 'dsn') GROUP BY 1 ORDER BY 2 DESC",
        tenant_id,
    )
    summary["bounced_by_category"] = {row["category"]: row["n"] for row in rows}
    latency = await pool.fetchrow(
        """
        SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms) AS p
          FROM (SELECT extract(epoch FROM e.at - r.queued_at) * 1000 AS ms
                  FROM events e JOIN recipients r ON r.id = e.recipient_id
                 WHERE e.tenant_id = $1 AND e.kind = 'delivered') d
        """,
        tenant_id,
    )
    p = latency["p"] or [None, None, None]
    summary["latency_ms"] = {
        name: (round(value, 1) if value is not None else None) for name, value in zip(("p50", "p95", "p99"), p)
    }
    summary["messages"] = submitted
    summary["elapsed_s"] = round(elapsed_s, 2)
    summary["messages_per_s"] = round(submitted / elapsed_s, 1) if elapsed_s > 0 else 0.0
    return summary


# ---- the scenario -------------------------------------------------------------------------------------------


class Demo:
    """Owns everything the demo starts; `close()` stops it all in reverse order (idempotent)."""

    def __init__(self, options: DemoOptions, status: Status) -> None:
        self.options = options
        self.status = status
        self.root: Path | None = None
        self.cluster: EmbeddedPostgres | None = None
        self.world: RemoteWorld | None = None
        self.daemon: Daemon | None = None
        self.metrics_url = ""
        self.top_hint = ""
        self.smtp_clients: list[aiosmtplib.SMTP] = []

    async def run(self) -> dict:
        options, status = self.options, self.status
        rng = random.Random(options.seed)
        self.root = Path(tempfile.mkdtemp(prefix="mtad-demo-", dir="/tmp"))
        os.chmod(self.root, 0o755)  # as root, the cluster runs as `postgres`, which must traverse it

        status.phase = "starting PostgreSQL"
        self.cluster = EmbeddedPostgres(self.root / "pg", durable=False)
        starting = asyncio.ensure_future(asyncio.to_thread(self.cluster.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            await asyncio.wait({starting}, timeout=STEP_TIMEOUT_S)  # let it finish before close() stops it
            raise
        db_url = self.cluster.url()

        status.phase = "starting the simulated providers"
        addresses, unknown = address_pool(max(20, options.messages // 4), rng)
        self.world = build_world(unknown)
        await self.world.start()
        publish_domains(self.world)

        status.phase = "starting mtad"
        (self.root / "shaping.toml").write_text(SHAPING)
        write_key(self.root / "state" / "dkim", SENDING_DOMAIN, "demo", generate_private_key("rsa"))
        self.daemon = Daemon(parse_settings(daemon_document(self.root, db_url, self.world), {}), None)
        await self.daemon.start()
        daemon = self.daemon
        password = os.urandom(12).hex()
        tenants = TenantStore(daemon.pool)
        tenant_id = await tenants.insert_tenant(TENANT, hash_password(password))
        await tenants.add_tenant_domain(TENANT, SENDING_DOMAIN)
        host, http_port = daemon.http.bound[0]
        self.metrics_url = f"http://{host}:{http_port}/metrics"
        self.top_hint = f"MTAD_DATABASE_URL='{self.cluster.tcp_url()}' mtad top"
        submission_port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
        feedback_port = daemon.feedback_servers[0].sockets[0].getsockname()[1]

        plan = [
            (index, addresses[index % len(addresses)], index % 4 == 3)  # every fourth message transactional
            for index in range(options.messages)
        ]
        status.phase = "submitting"
        started = time.monotonic()
        done = asyncio.Event()
        confirmed: dict[str, float] = {}
        clicker = asyncio.create_task(click_unsubscribes(self.world, options.unsubscribes, status, done, confirmed))
        bouncer = asyncio.create_task(
            send_dsns(self.world, feedback_port, options.dsns, status, done, avoid=confirmed.__contains__)
        )
        submitter = asyncio.create_task(
            submit_all(submission_port, password, plan, options.clients, status, self.smtp_clients)
        )
        try:
            while not submitter.done():
                await refresh_status(daemon.pool, tenant_id, status)
                await asyncio.wait({submitter}, timeout=STATUS_INTERVAL_S)
            submitter.result()

            status.phase = "delivering"
            deadline = time.monotonic() + options.drain_timeout_s
            while time.monotonic() < deadline:
                pending = await refresh_status(daemon.pool, tenant_id, status)
                side_tasks_done = clicker.done() and bouncer.done()
                if pending == 0 and side_tasks_done:
                    break
                if pending == 0 and time.monotonic() - started > 10:
                    break  # nothing left to click or bounce: not enough copies reached the healthy provider
                await asyncio.sleep(STATUS_INTERVAL_S)
            else:
                status.notes.append(f"the queue was not empty after {options.drain_timeout_s:.0f} s")
            elapsed = time.monotonic() - started
        finally:
            done.set()
            for task in (clicker, bouncer, submitter):
                task.cancel()
            await asyncio.gather(clicker, bouncer, submitter, return_exceptions=True)
        await asyncio.sleep(0.2)  # let the last DSN's transaction land before reading
        status.phase = "summarising"
        summary = await summarise(daemon.pool, tenant_id, status.submitted, elapsed)
        summary["deliveries_after_unsubscribe"] = deliveries_after_unsubscribe(self.world, confirmed)
        summary["provider_refusals"] = provider_refusals(self.world)
        summary["metrics_url"] = self.metrics_url
        summary["workdir"] = str(self.root)  # removed when the demo stops
        summary["notes"] = list(status.notes)
        return summary

    async def close(self) -> None:
        """Stop what was started, in reverse order, each step bounded; the temporary directory goes last."""
        self.status.phase = "stopping"
        for smtp in self.smtp_clients:
            smtp.close()
        self.smtp_clients.clear()
        if self.daemon is not None:
            daemon, self.daemon = self.daemon, None
            await self._bounded("stopping the daemon", daemon.stop())
        if self.world is not None:
            world, self.world = self.world, None
            await self._bounded("stopping the simulated providers", world.stop())
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await self._bounded("stopping PostgreSQL", asyncio.to_thread(cluster.stop, "immediate"))
        if self.root is not None:
            root, self.root = self.root, None
            await asyncio.to_thread(shutil.rmtree, root, True)

    def close_at_exit(self) -> None:
        """Last resort when the event loop is gone before close() finished (a second Ctrl-C): the cluster runs
        in its own session and would outlive this process; sockets and tasks die with the process anyway."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            try:
                cluster.stop("immediate")
            except Exception:  # noqa: BLE001
                log.exception("stopping PostgreSQL failed")
        if self.root is not None:
            root, self.root = self.root, None
            shutil.rmtree(root, True)

    async def _bounded(self, what: str, step) -> None:
        try:
            await asyncio.wait_for(step, STEP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a failed step must not keep the rest running
            log.exception("%s failed", what)


async def run_scenario(options: DemoOptions, status: Status, on_started: Callable[[Demo], None] | None = None) -> dict:
    demo = Demo(options, status)
    try:
        if on_started is not None:
            on_started(demo)
        return await demo.run()
    finally:
        await demo.close()


def quiet_logs(verbose: bool) -> None:
    """The daemon's own events would drown the progress display; only errors unless --verbose."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s %(message)s")
    if not verbose:
        for name in ("mtad", "mail.log", "aiosmtpd", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL if name == "mail.log" else logging.ERROR)

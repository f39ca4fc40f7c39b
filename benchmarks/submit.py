"""Submission benchmark: how many messages per second mtad accepts, and how long each acceptance takes.

Run:
    make bench-submit BENCH_ARGS="--messages 5000 --clients 1,20"
    .venv/bin/python benchmarks/submit.py --messages 5000 --clients 1,20 [--no-reuse] [--json out.json]

For each client count it starts from nothing: a fresh private PostgreSQL with production durability
(fsync and synchronous_commit on), the schema, one tenant, and a real `python -m mtad run` subprocess on
127.0.0.1. Each client does STARTTLS (self-signed, not verified) and AUTH PLAIN, then sends messages back to
back; a `250` means the message and all its recipients are committed. After a warm-up that is not counted,
`--messages` messages are spread over the clients; the latency of one message is MAIL FROM to the 250 after
DATA. Afterwards SQL checks that exactly the acknowledged messages (and their recipients) are stored.

CPU columns are seconds of CPU per 1000 accepted messages during the measured phase, for the daemon, for
PostgreSQL (postmaster and all its children) and for this client process: on a machine where their sum
per second approaches the number of cores, the biggest one is the bottleneck.

Everything (cluster, daemon, temp dirs) is stopped and removed at the end, on errors and on Ctrl-C too.
Traffic stays on loopback; every run is bounded by --messages and by --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import asyncpg

from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import migrate
from mtad.tenants.passwords import hash_password
from mtad.tenants.store import TenantStore

TENANT = "bench"
DOMAIN = "bench.example"
SENDER = f"news@{DOMAIN}"
PASSWORD = secrets.token_urlsafe(16)
WARMUP_MESSAGES = 100
READY_TIMEOUT_S = 30
SMTP_TIMEOUT_S = 30
SETUP_TIMEOUT_S = 60  # connecting the clients and the warm-up
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUEUED_AS = re.compile(r"queued as (\S+)")


def client_tls_context() -> ssl.SSLContext:
    """One shared non-verifying context (the daemon's certificate is self-signed). Without it aiosmtplib
    builds a context per connection, loading the system CA store each time: ~25 ms of client CPU."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


TLS_CONTEXT = client_tls_context()


# -- arguments --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mtad submission throughput and latency")
    parser.add_argument("--messages", type=int, default=5000, help="measured messages per run (default 5000)")
    parser.add_argument("--clients", action="append", metavar="C[,C...]",
                        help="parallel clients; repeat or comma-separate for several runs (default 1,20)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message (default 1)")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="one authenticated connection per client (default); --no-reuse: a new "
                             "connection + STARTTLS + AUTH for every message")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--time-limit", type=float, default=300, metavar="S",
                        help="hard cap in seconds on the load of each run (default 300)")
    args = parser.parse_args(argv)
    try:
        args.clients = [int(c) for value in (args.clients or ["1,20"]) for c in value.split(",") if c.strip()]
    except ValueError:
        parser.error("--clients takes integers, e.g. --clients 1,20")
    if args.messages < 1 or args.size < 512 or args.recipients < 1 or args.time_limit <= 0:
        parser.error("need --messages >= 1, --size >= 512, --recipients >= 1, --time-limit > 0")
    if not args.clients or min(args.clients) < 1 or max(args.clients) > 500:
        parser.error("--clients must be between 1 and 500")
    return args


# -- the message ------------------------------------------------------------------------------------

def html_body(size: int) -> bytes:
    """A multipart/alternative text + HTML newsletter body of `size` bytes (at least one table row)."""
    row = ('<tr><td style="padding:8px;font-family:Arial,sans-serif;color:#333333">'
           'Our spring collection is here: <a href="https://shop.example/spring?utm_source=news">'
           'see what is new</a> and save 20% this week.</td></tr>\r\n')
    text = "Our spring collection is here: https://shop.example/spring - save 20% this week.\r\n"
    head = ("--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text * 3 +
            "\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            "<html><body><table width=\"600\" cellpadding=\"0\" cellspacing=\"0\">\r\n")
    tail = "</table></body></html>\r\n--b1--\r\n"
    rows, rest = divmod(max(0, size - len(head) - len(tail)), len(row))
    filler = f"<!--{'.' * (rest - 9)}-->\r\n" if rest >= 9 else ""
    return (head + row * max(1, rows) + filler + tail).encode()


def sized_body(size: int, recipients_per_message: int) -> bytes:
    """The body that makes a whole message (headers included) about `size` bytes."""
    header_len = len(make_message(0, recipients_of(0, recipients_per_message), b""))
    return html_body(size - header_len)


def make_message(index: int, recipients: list[str], body: bytes) -> bytes:
    headers = (f"From: Spring News <{SENDER}>\r\n"
               f"To: {', '.join(recipients)}\r\n"
               f"Subject: Spring collection #{index}\r\n"
               f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
               f"Message-ID: <bench-{index}-{secrets.token_hex(6)}@{DOMAIN}>\r\n"
               "MIME-Version: 1.0\r\n"
               'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n')
    return headers.encode() + body


def recipients_of(index: int, count: int) -> list[str]:
    return [f"reader{index}.{n}@inbox.example" for n in range(count)]


# -- PostgreSQL and the daemon ----------------------------------------------------------------------

async def prepare_database(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await migrate(conn)
        store = TenantStore(conn)
        await store.insert_tenant(TENANT, hash_password(PASSWORD))
        await store.add_tenant_domain(TENANT, DOMAIN)
    finally:
        await conn.close()


def write_config(path: Path, db_url: str, state_dir: Path) -> None:
    q = json.dumps  # a JSON string is a valid TOML basic string
    path.write_text(f"""hostname = "mtad.bench"
state_dir = {q(str(state_dir))}
shutdown_grace = "10s"

[database]
url = {q(db_url)}

[submission]
listen = ["127.0.0.1:0"]
implicit_tls_listen = []

[delivery]
enabled = false  # submission alone: benchmarks/deliver.py measures the whole relay

[http]
listen = ["127.0.0.1:0"]

[logging]
format = "json"
level = "info"
""")


def start_daemon(config: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """`python -m mtad run`; returns the process and its submission port once it logged daemon.ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTAD_")}  # only our config counts
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mtad", "--config", str(config), "run"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                start_new_session=True)  # Ctrl-C reaches us only; we stop it ourselves
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"daemon.ready"' in line:
                address = json.loads(line)["listening"][0]
                return proc, int(address.rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise RuntimeError(f"mtad exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    stop_daemon(proc)
    raise RuntimeError(f"mtad was not ready within {READY_TIMEOUT_S}s:\n{log_path.read_text()[-2000:]}")


def stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- /proc readings ---------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields after "(comm)"


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime+stime of `pid` (plus cutime+cstime of its reaped children when `children`)."""
    fields = _stat_fields(pid)  # fields[0] is stat field 3 (state): utime is field 14, stime 15, cutime 16
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / CLOCK_TICKS


def postgres_cpu_seconds(postmaster: int) -> float:
    """The postmaster, its live children (backends, checkpointer, WAL writer...) and the ones that exited."""
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(int(entry.name))
            except (OSError, IndexError):
                continue  # exited meanwhile
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the load ---------------------------------------------------------------------------------------

@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, MAIL to the 250 after DATA
    queue_ids: list[str] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # reply code (or exception name) -> count
    refused_recipients: int = 0


class Client:
    """One SMTP client: connects, STARTTLS, EHLO, AUTH PLAIN; then sends messages on that connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.smtp: aiosmtplib.SMTP | None = None

    async def open(self) -> aiosmtplib.SMTP:
        if self.smtp is None or not self.smtp.is_connected:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False, validate_certs=False,
                                   tls_context=TLS_CONTEXT, local_hostname="bench.client",
                                   timeout=SMTP_TIMEOUT_S)
            await smtp.connect()
            await smtp.starttls()
            await smtp.ehlo()
            await smtp.auth_plain(TENANT, PASSWORD)
            self.smtp = smtp
        return self.smtp

    async def close(self) -> None:
        if self.smtp is not None and self.smtp.is_connected:
            try:
                await self.smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                self.smtp.close()
        self.smtp = None

    async def send(self, index: int, recipients_per_message: int, body: bytes, tally: Tally, reuse: bool) -> None:
        recipients = recipients_of(index, recipients_per_message)
        message = make_message(index, recipients, body)
        try:
            smtp = await self.open()
            started = time.perf_counter()
            errors, reply = await smtp.sendmail(SENDER, recipients, message)
            tally.latencies.append(time.perf_counter() - started)
            tally.queue_ids.append(m.group(1) if (m := QUEUED_AS.search(reply)) else "?")
            tally.refused_recipients += len(errors)
        except aiosmtplib.SMTPResponseException as exc:
            tally.refused[str(exc.code)] += 1
        except aiosmtplib.SMTPRecipientsRefused as exc:
            tally.refused[str(exc.recipients[0].code)] += 1
        except (aiosmtplib.SMTPException, OSError) as exc:
            tally.refused[type(exc).__name__] += 1
            await self.close()
        if not reuse:
            await self.close()


async def send_all(clients: list[Client], indices: range, args: argparse.Namespace, body: bytes,
                   tally: Tally) -> None:
    """Every client takes the next message index until none is left (no client idles while others work)."""
    work = iter(indices)

    async def worker(client: Client) -> None:
        for index in work:
            await client.send(index, args.recipients, body, tally, args.reuse)
            if asyncio.current_task().cancelling():  # aiosmtplib may turn a cancel into a disconnect error
                raise asyncio.CancelledError

    await asyncio.gather(*(worker(client) for client in clients))


async def load(port: int, n_clients: int, args: argparse.Namespace, measure: dict) -> tuple[Tally, Tally]:
    """Connect (when reusing), warm up, then the measured phase; `measure` gets the CPU readings.

    Returns the warm-up's tally and the measured one."""
    body = sized_body(args.size, args.recipients)
    clients = [Client(port) for _ in range(n_clients)]
    warmup, tally = Tally(), Tally()
    try:
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            if args.reuse:
                await asyncio.gather(*(client.open() for client in clients))
            await send_all(clients, range(-WARMUP_MESSAGES, 0), args, body, warmup)
        measure["before"] = measure["read"]()
        measure["started"] = time.perf_counter()
        try:
            async with asyncio.timeout(args.time_limit):
                await send_all(clients, range(args.messages), args, body, tally)
        except TimeoutError:
            measure["timed_out"] = True
        measure["elapsed"] = time.perf_counter() - measure["started"]
        measure["after"] = measure["read"]()
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return warmup, tally


async def verify(url: str, warmup: Tally, tally: Tally, recipients_per_message: int) -> list[str]:
    """Problems found in the database, or []: every 250 is one stored message with all its recipients."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM messages WHERE queue_id = ANY($1)", tally.queue_ids)
        rcpts = await conn.fetchval("SELECT count(*) FROM recipients r JOIN messages m ON m.id = r.message_id "
                                    "WHERE m.queue_id = ANY($1)", tally.queue_ids)
        total = await conn.fetchval("SELECT count(*) FROM messages")
    finally:
        await conn.close()
    accepted = len(tally.queue_ids)
    problems = []
    if stored != accepted or len(set(tally.queue_ids)) != accepted:
        problems.append(f"{accepted} messages got 250 but {stored} of their queue ids are stored")
    want_rcpts = accepted * recipients_per_message - tally.refused_recipients
    if rcpts != want_rcpts:
        problems.append(f"expected {want_rcpts} stored recipients, found {rcpts}")
    if total != accepted + len(warmup.queue_ids):
        problems.append(f"{total} messages stored in all, expected {accepted} + {len(warmup.queue_ids)} warm-up")
    if warmup.refused:
        problems.append(f"warm-up messages refused: {dict(warmup.refused)}")
    return problems


# -- one run ----------------------------------------------------------------------------------------

def percentile_ms(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil
    return sorted_values[int(rank) - 1] * 1000


def run_one(n_clients: int, args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mtad-bench-"))
    os.chmod(workdir, 0o755)  # as root the server runs as `postgres`, which must traverse to its directory
    cluster = EmbeddedPostgres(workdir / "pg", durable=True)
    daemon: subprocess.Popen | None = None
    try:
        cluster.start(timeout_s=60)
        url = cluster.url()
        asyncio.run(prepare_database(url))
        config = workdir / "mtad.toml"
        write_config(config, url, workdir / "state")
        daemon, port = start_daemon(config, workdir / "mtad.log")
        postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        pid = daemon.pid
        measure: dict = {"read": lambda: (cpu_seconds(pid), postgres_cpu_seconds(postmaster), client_cpu_seconds())}
        warmup, tally = run_async(load(port, n_clients, args, measure))
        if daemon.poll() is not None:
            raise RuntimeError(f"mtad exited with {daemon.returncode} during the run")
        peak_rss = peak_rss_mb(pid)
        problems = run_async(verify(url, warmup, tally, args.recipients))
        if measure.get("timed_out"):
            problems.append(f"stopped by --time-limit {args.time_limit:g}s after {len(tally.queue_ids)} messages "
                            f"(messages in flight may be stored without their 250 reaching a client)")
        return summarize(n_clients, args, tally, measure, peak_rss, problems)
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        try:
            cluster.stop("fast", timeout_s=60)
        finally:
            if cluster.home != cluster.root and cluster.home.name.startswith("pg-"):
                shutil.rmtree(cluster.home, ignore_errors=True)  # a fall-back home outside workdir
            shutil.rmtree(workdir, ignore_errors=True)


def run_async(coroutine):
    """asyncio.run on uvloop when it is installed (as the daemon does), so the client costs little CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def summarize(n_clients: int, args: argparse.Namespace, tally: Tally, measure: dict, peak_rss: float,
              problems: list[str]) -> dict:
    accepted = len(tally.queue_ids)
    elapsed = measure["elapsed"]
    per_1k = 1000 / accepted if accepted else float("nan")
    cpu = [after - before for before, after in zip(measure["before"], measure["after"])]
    latencies = sorted(tally.latencies)
    return {
        "messages": args.messages, "clients": n_clients, "reuse": args.reuse, "size": args.size,
        "recipients": args.recipients, "accepted": accepted, "refused": dict(tally.refused),
        "elapsed_s": round(elapsed, 2), "msg_per_s": round(accepted / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile_ms(latencies, 50), 1), "p95_ms": round(percentile_ms(latencies, 95), 1),
        "p99_ms": round(percentile_ms(latencies, 99), 1),
        "daemon_cpu_s_per_1k": round(cpu[0] * per_1k, 2), "postgres_cpu_s_per_1k": round(cpu[1] * per_1k, 2),
        "client_cpu_s_per_1k": round(cpu[2] * per_1k, 2), "daemon_peak_rss_mb": round(peak_rss, 1),
        "ok": not problems, "problems": problems,
    }


# -- report -----------------------------------------------------------------------------------------

COLUMNS = [("messages", "messages"), ("clients", "clients"), ("accepted", "accepted"), ("elapsed_s", "elapsed s"),
           ("msg_per_s", "msg/s"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
           ("daemon_cpu_s_per_1k", "daemon CPU s/1k"), ("postgres_cpu_s_per_1k", "PG CPU s/1k"),
           ("client_cpu_s_per_1k", "client CPU s/1k"), ("daemon_peak_rss_mb", "daemon peak RSS MB")]


def machine() -> dict:
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(result[key]) for key, _ in COLUMNS) + " |" for result in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    print(f"machine: nproc {info['nproc']}, Python {info['python']}, {info['platform']}")
    print(f"load: {args.messages} messages of {args.size} bytes, {args.recipients} recipient(s) each, "
          f"{'one connection per client' if args.reuse else 'a new connection + STARTTLS + AUTH per message'}, "
          f"{WARMUP_MESSAGES} warm-up messages not counted; durable PostgreSQL", flush=True)
    results = []
    for n_clients in args.clients:
        print(f"running {n_clients} client(s)...", file=sys.stderr, flush=True)
        result = run_one(n_clients, args)
        results.append(result)
    print()
    print(markdown_table(results))
    for result in results:
        if result["refused"]:
            print(f"refused with {result['clients']} client(s): {result['refused']}")
        for problem in result["problems"]:
            print(f"FAIL ({result['clients']} client(s)): {problem}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "reuse": args.reuse, "results": results}, indent=2) + "\n")
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cluster and daemon stopped", file=sys.stderr)
        sys.exit(130)

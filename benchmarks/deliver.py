"""End-to-end relay benchmark: submission -> DKIM signing -> delivery to a remote SMTP server.

Run:
    .venv/bin/python benchmarks/deliver.py --messages 5000 --clients 20
    .venv/bin/python benchmarks/deliver.py --messages 3000 --clients 20 --dual --json /tmp/deliver.json
    .venv/bin/python benchmarks/deliver.py --sink smtp-sink        # Postfix's smtp-sink: throughput only

It starts from nothing, like benchmarks/submit.py (whose helpers it imports): a fresh private PostgreSQL with
production durability, the schema, one tenant, an RSA DKIM key for the tenant's domain (with --dual an
Ed25519 key too, so two signatures per message), a sink SMTP server on 127.0.0.1, and a real
`python -m mtad run` whose static route sends every domain to that sink (one site, up to 20 connections,
1000 deliveries per connection, no rate limit).

The sink is aiosmtpd in a separate process (so it does not share an event loop, or a core, with the
injector). For every message it records the arrival time, the `X-Bench-Sent` stamp (time.time() when the
injector started the SMTP transaction), the `X-Bench-Id` and how many `DKIM-Signature` fields arrived, and
keeps a few raw messages whose signatures this script checks with dkimpy. With `--sink smtp-sink` the
remote side is Postfix's smtp-sink instead (cheaper, but it sees no headers: no latency, no DKIM count).

`--clients` authenticated clients (STARTTLS + AUTH PLAIN, connected before the clock starts) inject
`--messages` ~5 KB messages, one recipient each, spread over `--domains` recipient domains with a Zipf-like
skew (domain k gets weight 1/k). Then it waits until the sink has every message and PostgreSQL has every
recipient in state `delivered`, all within `--time-limit` seconds from the first injection.

Reported: injected msg/s; delivered msg/s = N / (last arrival - first injection); latency submit -> arrival
p50/p95/p99; the share of messages carrying the expected DKIM signatures (must be 100 %); CPU seconds per
1000 messages over the same window for the daemon, PostgreSQL (postmaster and children), the injector (this
process) and the sink; daemon peak RSS (VmHWM). It prints FAIL and exits 1 when a recipient is not
`delivered`, a message is missing, duplicated or unsigned, a sampled signature does not verify, or the
daemon logged warnings or errors.

To find the bottleneck it also prints the average cores each of them kept busy, for the whole window and
split into the injection and the drain after it, next to the whole machine's busy cores (/proc/stat: other
processes included, so a run on a shared machine can be recognised). `--timeline` prints messages injected
and arrived per second; `--pool-size` changes the daemon's PostgreSQL pool to try another setting.

Everything (sink, daemon, cluster, temp dirs) is stopped and removed at the end, on errors and Ctrl-C too.
Traffic stays on loopback; every run is bounded by --messages and by --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import pty
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import submit  # noqa: E402  (benchmarks/submit.py: cluster, daemon, /proc and client helpers)

from mtad.db.embedded import EmbeddedPostgres  # noqa: E402
from mtad.sign.keys import DomainKey, dns_record_name, dns_record_value, generate_private_key, write_key  # noqa: E402

DOMAIN = submit.DOMAIN  # the tenant's sending domain, signed with d=DOMAIN
SENDER = submit.SENDER
RSA_SELECTOR = "bench-rsa"
ED25519_SELECTOR = "bench-ed"
SINK_READY_TIMEOUT_S = 15
DB_SETTLE_TIMEOUT_S = 30  # after the sink has everything: the last outcomes reach PostgreSQL in batches
SAMPLES = 5  # raw messages the sink keeps for the dkimpy check
SHAPING = """[default]
connection_limit = 20
initial_destination_concurrency = 10
max_deliveries_per_connection = 1000
"""


# -- arguments --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mtad end-to-end relay benchmark (submission -> remote SMTP sink)")
    parser.add_argument("--messages", type=int, default=5000, help="messages to inject (default 5000)")
    parser.add_argument("--clients", type=int, default=20, help="parallel authenticated clients (default 20)")
    parser.add_argument("--domains", type=int, default=50, help="recipient domains, Zipf-skewed (default 50)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    parser.add_argument("--dual", action="store_true", help="RSA and Ed25519 keys: two signatures per message")
    parser.add_argument("--sink", choices=("aiosmtpd", "smtp-sink"), default="aiosmtpd",
                        help="aiosmtpd (default; latency and DKIM checks) or Postfix's smtp-sink (throughput only)")
    parser.add_argument("--time-limit", type=float, default=300, metavar="S",
                        help="hard cap in seconds on injection plus delivery (default 300)")
    parser.add_argument("--pool-size", type=int, metavar="N",
                        help="the daemon's [database] pool_max_size (default: the daemon's default, 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the recipient-domain draw (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--daemon-log", type=Path, metavar="PATH", help="keep a copy of the daemon's log here")
    parser.add_argument("--timeline", action="store_true",
                        help="also print messages injected and arrived per second (aiosmtpd sink)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.domains < 1 or args.size < 1024 or args.time_limit <= 0:
        parser.error("need --messages >= 1, --domains >= 1, --size >= 1024, --time-limit > 0")
    if args.pool_size is not None and args.pool_size < 2:
        parser.error("--pool-size must be at least 2")
    if not 1 <= args.clients <= 500:
        parser.error("--clients must be between 1 and 500")
    if args.sink == "smtp-sink" and not smtp_sink_path():
        parser.error("--sink smtp-sink needs Postfix's smtp-sink (make setup installs it)")
    return args


# -- the messages -----------------------------------------------------------------------------------

def recipient_domains(count: int, domains: int, seed: int) -> list[str]:
    """One recipient domain per message; domain k (1-based) has weight 1/k, so a few get most of the mail."""
    names = [f"rcpt{k:03d}.example" for k in range(1, domains + 1)]
    return random.Random(seed).choices(names, weights=[1 / k for k in range(1, domains + 1)], k=count)


def make_message(index: int, recipient: str, body: bytes, sent: float) -> bytes:
    headers = (f"From: Spring News <{SENDER}>\r\n"
               f"To: {recipient}\r\n"
               f"Subject: Spring collection #{index}\r\n"
               f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(sent))}\r\n"
               f"Message-ID: <bench-{index}-{secrets.token_hex(6)}@{DOMAIN}>\r\n"
               f"X-Bench-Id: {index}\r\n"
               f"X-Bench-Sent: {sent:.6f}\r\n"
               "MIME-Version: 1.0\r\n"
               'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n')
    return headers.encode() + body


def sized_body(size: int) -> bytes:
    header_len = len(make_message(10**6, "reader1000000@rcpt001.example", b"", time.time()))
    return submit.html_body(size - header_len)


# -- the sink ---------------------------------------------------------------------------------------

# Runs as `python -c SINK_SCRIPT RESULT_FILE PROGRESS_FILE MAX_SECONDS SAMPLES`: binds 127.0.0.1:0, prints the
# port, answers 250 to everything, rewrites PROGRESS_FILE ("count last-arrival") every 0.1 s, and on
# SIGTERM/SIGINT (or after MAX_SECONDS: a safety net should this script die without stopping it) writes
# RESULT_FILE. Headers are found with regular expressions on the raw bytes: no email parsing per message.
SINK_SCRIPT = r'''
import asyncio, base64, json, logging, os, re, signal, socket, sys, time
from aiosmtpd.smtp import SMTP

result_path, progress_path, max_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
SAMPLES = int(sys.argv[4])
logging.getLogger("mail.log").setLevel(logging.CRITICAL)
SENT = re.compile(rb"^X-Bench-Sent:[ \t]*([0-9.]+)", re.M | re.I)
ID = re.compile(rb"^X-Bench-Id:[ \t]*(-?[0-9]+)", re.M | re.I)
DKIM = re.compile(rb"^DKIM-Signature:", re.M | re.I)
arrivals, sent, ids, dkim, samples = [], [], [], [], []
transactions = 0

class Handler:
    async def handle_DATA(self, server, session, envelope):
        global transactions
        now = time.time()
        content = envelope.original_content or envelope.content
        end = content.find(b"\r\n\r\n")
        head = content if end < 0 else content[:end + 2]
        m_sent, m_id = SENT.search(head), ID.search(head)
        transactions += 1
        for _ in envelope.rcpt_tos:  # one record per recipient delivered in this transaction
            arrivals.append(now)
            sent.append(float(m_sent.group(1)) if m_sent else None)
            ids.append(int(m_id.group(1)) if m_id else None)
            dkim.append(len(DKIM.findall(head)))
        if len(samples) < SAMPLES:
            samples.append(base64.b64encode(content).decode())
        return "250 2.0.0 Ok: queued"

async def main():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    handler = Handler()
    server = await loop.create_server(lambda: SMTP(handler, hostname="sink.bench", ident="bench sink"),
                                      sock=sock, backlog=1000)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(sock.getsockname()[1], flush=True)
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        tmp = progress_path + ".tmp"
        with open(tmp, "w") as out:
            out.write(f"{len(arrivals)} {arrivals[-1] if arrivals else 0}\n")
        os.replace(tmp, progress_path)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
    server.close()
    with open(result_path + ".tmp", "w") as out:
        json.dump({"arrivals": arrivals, "sent": sent, "ids": ids, "dkim": dkim, "samples": samples,
                   "transactions": transactions}, out)
    os.replace(result_path + ".tmp", result_path)

try:
    import uvloop
except ImportError:
    asyncio.run(main())
else:
    uvloop.run(main())
'''


class AiosmtpdSink:
    """The aiosmtpd sink process; `received()` reads its progress file, `stop()` returns its records."""

    def __init__(self, workdir: Path, max_seconds: float) -> None:
        self.result_path = workdir / "sink-result.json"
        self.progress_path = workdir / "sink-progress"
        with (workdir / "sink.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SINK_SCRIPT, str(self.result_path), str(self.progress_path),
                 str(max_seconds), str(SAMPLES)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True)  # Ctrl-C reaches us only; we stop it ourselves
        self.port = int(_read_line(self.proc, SINK_READY_TIMEOUT_S, workdir / "sink.log"))

    def cpu_seconds(self) -> float:
        return submit.cpu_seconds(self.proc.pid)

    def received(self) -> tuple[int, float]:
        """(messages received so far, time.time() of the last arrival)."""
        try:
            count, last = self.progress_path.read_text().split()
            return int(count), float(last)
        except (OSError, ValueError):
            return 0, 0.0

    def stop(self) -> dict:
        _terminate(self.proc)
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {}


class PostfixSink:
    """`smtp-sink -c`: counts messages (`sess=.. quit=.. mesg=N`, CR-separated) on its stdout, a pseudo-terminal
    because smtp-sink writes the counter through a buffered stream that is flushed live only to a tty."""

    def __init__(self, workdir: Path, max_seconds: float) -> None:
        self.port = _free_port()  # smtp-sink cannot report a port it chose; a race here is unlikely on loopback
        # timeout(1) is the safety net should this script die without stopping it: smtp-sink drops to
        # `nobody`, which clears a parent-death signal, and it has no time limit of its own.
        command = ["timeout", "-k", "5", str(int(max_seconds)), smtp_sink_path(), "-c"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # required when started as root
        command += [f"127.0.0.1:{self.port}", "1000"]
        self._tty, terminal = pty.openpty()
        try:
            with (workdir / "sink.log").open("wb") as log:
                self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=log,
                                             start_new_session=True)
        finally:
            os.close(terminal)
        self._count, self._last = 0, 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + SINK_READY_TIMEOUT_S
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start: {(workdir / 'sink.log').read_text()[-1000:]}")
            time.sleep(0.05)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._tty, 4096)
            except OSError:  # EIO: smtp-sink exited and the terminal is gone
                break
            if not chunk:
                break
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            for counters in done:
                if m := re.search(rb"mesg=(\d+)", counters):
                    count = int(m.group(1))
                    if count > self._count:
                        self._count, self._last = count, time.time()

    def received(self) -> tuple[int, float]:
        return self._count, self._last

    def cpu_seconds(self) -> float:
        """timeout(1) and its child smtp-sink."""
        return submit.cpu_seconds(self.proc.pid) + sum(submit.cpu_seconds(pid) for pid in children_of(self.proc.pid))

    def stop(self) -> dict:
        _terminate(self.proc)
        self._reader.join(2)
        if self._tty >= 0:
            os.close(self._tty)
            self._tty = -1
        return {"count": self._count, "last": self._last}


def smtp_sink_path() -> str | None:
    return shutil.which("smtp-sink", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    return found


def _read_line(proc: subprocess.Popen, timeout_s: float, log: Path) -> str:
    """The first stdout line of `proc`, within `timeout_s`."""
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not line or not line[0].strip():
        raise RuntimeError(f"the sink did not start: {log.read_text(errors='replace')[-1500:]}")
    return line[0].decode().strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- daemon configuration ---------------------------------------------------------------------------

def write_keys(key_dir: Path, dual: bool) -> list[DomainKey]:
    keys = [write_key(key_dir, DOMAIN, RSA_SELECTOR, generate_private_key("rsa"))]
    if dual:
        keys.append(write_key(key_dir, DOMAIN, ED25519_SELECTOR, generate_private_key("ed25519")))
    return keys


def write_config(workdir: Path, db_url: str, sink_port: int, pool_size: int | None) -> Path:
    """submit.py's config (JSON logs, submission on 127.0.0.1:0), plus DKIM and the static route to the sink."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    config = workdir / "mtad.toml"
    submit.write_config(config, db_url, workdir / "state")
    if pool_size:
        text = config.read_text()
        url_line = f"url = {q(db_url)}\n"
        assert url_line in text, "submit.write_config changed its [database] section"
        config.write_text(text.replace(url_line, f"{url_line}pool_max_size = {pool_size}\n", 1))
    shaping = workdir / "shaping.toml"
    shaping.write_text(SHAPING)
    with config.open("a") as out:
        out.write(f"""
[dkim]
key_dir = {q(str(workdir / "dkim"))}

[delivery]
routes = {{ "*" = {q(f"127.0.0.1:{sink_port}")} }}
shaping_file = {q(str(shaping))}
""")
    return config


# -- the injection ----------------------------------------------------------------------------------

@dataclass
class Injection:
    queue_ids: list[str] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # reply code (or exception name) -> count
    first_sent: float = 0.0  # time.time() of the first transaction
    elapsed: float = 0.0
    timed_out: bool = False


async def send_one(client: submit.Client, index: int, recipient: str, body: bytes, result: Injection) -> None:
    try:
        smtp = await client.open()
        sent = time.time()
        if not result.first_sent:
            result.first_sent = sent
        errors, reply = await smtp.sendmail(SENDER, [recipient], make_message(index, recipient, body, sent))
        if errors:
            result.refused["recipient"] += 1
        else:
            result.queue_ids.append(m.group(1) if (m := submit.QUEUED_AS.search(reply)) else "?")
    except aiosmtplib.SMTPResponseException as exc:
        result.refused[str(exc.code)] += 1
    except aiosmtplib.SMTPRecipientsRefused as exc:
        result.refused[str(exc.recipients[0].code)] += 1
    except (aiosmtplib.SMTPException, OSError) as exc:
        result.refused[type(exc).__name__] += 1
        await client.close()


async def inject(port: int, args: argparse.Namespace, on_connected) -> Injection:
    """Connect and authenticate every client (not timed), call `on_connected`, then send all messages."""
    body = sized_body(args.size)
    domains = recipient_domains(args.messages, args.domains, args.seed)
    clients = [submit.Client(port) for _ in range(args.clients)]
    result = Injection()
    try:
        async with asyncio.timeout(submit.SETUP_TIMEOUT_S):
            await asyncio.gather(*(client.open() for client in clients))
        on_connected()
        work = iter(range(args.messages))

        async def worker(client: submit.Client) -> None:
            for index in work:
                await send_one(client, index, f"reader{index}@{domains[index]}", body, result)
                if asyncio.current_task().cancelling():  # aiosmtplib may turn a cancel into a disconnect error
                    raise asyncio.CancelledError

        started = time.perf_counter()
        try:
            async with asyncio.timeout(args.time_limit):
                await asyncio.gather(*(worker(client) for client in clients))
        except TimeoutError:
            result.timed_out = True
        result.elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return result


# -- waiting and checking ---------------------------------------------------------------------------

def wait_for_sink(sink, daemon: subprocess.Popen, expected: int, deadline: float) -> bool:
    """Until the sink has `expected` messages or the deadline (time.monotonic()); progress on stderr."""
    next_report = time.monotonic() + 5
    while time.monotonic() < deadline:
        count, _ = sink.received()
        if count >= expected:
            return True
        for name, proc in (("the sink", sink.proc), ("mtad", daemon)):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} with {count}/{expected} messages at the sink")
        if time.monotonic() >= next_report:
            print(f"  sink has {count}/{expected}", file=sys.stderr, flush=True)
            next_report += 5
        time.sleep(0.05)
    return False


async def recipient_states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM recipients GROUP BY state")
    finally:
        await conn.close()
    return {row["state"]: row["n"] for row in rows}


async def wait_for_delivered(url: str, expected: int, timeout_s: float) -> dict[str, int]:
    """Poll until `expected` recipients are `delivered` (the outcome writer commits in batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = await recipient_states(url)
        if states.get("delivered", 0) >= expected or time.monotonic() >= deadline:
            return states
        await asyncio.sleep(0.1)


async def stuck_recipients(url: str, limit: int = 5) -> list[dict]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT m.queue_id, r.address, r.state, r.attempts, r.last_code, r.last_reply FROM recipients r "
            "JOIN messages m ON m.id = r.message_id WHERE r.state <> 'delivered' ORDER BY r.id LIMIT $1", limit)
    finally:
        await conn.close()
    return [dict(row) for row in rows]


def verify_samples(samples: list[str], keys: list[DomainKey]) -> tuple[int, list[str]]:
    """Check every DKIM signature of the sampled raw messages with dkimpy, against the keys' DNS records.

    Returns (signatures that verified, problems)."""
    try:
        import dkim
    except ImportError:
        return 0, ["dkimpy is not installed: the sampled signatures were not verified"]
    records = {f"{dns_record_name(key)}.".encode(): dns_record_value(key).encode() for key in keys}
    dnsfunc = lambda name, timeout=5: records.get(name)  # noqa: E731
    problems, verified = [], 0
    for number, sample in enumerate(samples):
        message = base64.b64decode(sample)
        count = len(re.findall(rb"^DKIM-Signature:", message, re.M | re.I))
        for index in range(count):
            try:
                ok = dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc)
            except Exception as exc:  # dkimpy raises on e.g. a missing PyNaCl for ed25519
                ok, note = False, f" ({type(exc).__name__}: {exc})"
            else:
                note = ""
            verified += ok
            if not ok:
                problems.append(f"sampled message {number}: DKIM signature {index + 1} of {count} "
                                f"does not verify{note}")
    return verified, problems


def daemon_log_problems(log_path: Path) -> tuple[Counter, list[str]]:
    """Warning and error events of the daemon's JSON log: counts by (level, event), and the first few lines."""
    counts: Counter = Counter()
    examples: list[str] = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():  # a traceback or other raw stderr output
                counts[("stderr", line.strip()[:80])] += 1
                if len(examples) < 5:
                    examples.append(line.strip()[:400])
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            counts[(entry["level"], entry.get("event", "?"))] += 1
            if len(examples) < 5:
                examples.append(line[:400])
    return counts, examples


# -- one run ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mtad-bench-deliver-"))
    os.chmod(workdir, 0o755)  # as root the server runs as `postgres`, which must traverse to its directory
    cluster = EmbeddedPostgres(workdir / "pg", durable=True)
    daemon: subprocess.Popen | None = None
    sink = None
    log_path = workdir / "mtad.log"
    try:
        cluster.start(timeout_s=60)
        url = cluster.url()
        submit.run_async(submit.prepare_database(url))
        keys = write_keys(workdir / "dkim", args.dual)
        sink = (AiosmtpdSink if args.sink == "aiosmtpd" else PostfixSink)(workdir, args.time_limit + 300)
        config = write_config(workdir, url, sink.port, args.pool_size)
        daemon, port = submit.start_daemon(config, log_path)
        postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        daemon_pid = daemon.pid

        def read_cpu() -> tuple[float, ...]:
            return (submit.cpu_seconds(daemon_pid), submit.postgres_cpu_seconds(postmaster),
                    submit.client_cpu_seconds(), sink.cpu_seconds(), machine_busy_seconds())

        clock: dict = {}

        def on_connected() -> None:
            clock["cpu_before"] = read_cpu()
            clock["start"] = time.monotonic()

        print(f"injecting {args.messages} messages with {args.clients} clients...", file=sys.stderr, flush=True)
        injection = submit.run_async(inject(port, args, on_connected))
        clock["cpu_injected"], clock["injected"] = read_cpu(), time.monotonic()
        accepted = len(injection.queue_ids)
        print(f"injected {accepted} in {injection.elapsed:.1f}s; waiting for the sink...", file=sys.stderr, flush=True)
        complete = wait_for_sink(sink, daemon, accepted, clock["start"] + args.time_limit)
        states = submit.run_async(wait_for_delivered(url, accepted, DB_SETTLE_TIMEOUT_S if complete else 1))
        cpu_after = read_cpu()
        window = time.monotonic() - clock["start"]
        if daemon.poll() is not None:
            raise RuntimeError(f"mtad exited with {daemon.returncode} during the run")
        peak_rss = submit.peak_rss_mb(daemon_pid)
        stuck = submit.run_async(stuck_recipients(url)) if states.get("delivered", 0) != sum(states.values()) else []
        received = sink.stop()
        log_counts, log_examples = daemon_log_problems(log_path)
        phases = {"injection": cores(clock["cpu_before"], clock["cpu_injected"], clock["injected"] - clock["start"]),
                  "drain": cores(clock["cpu_injected"], cpu_after, window - (clock["injected"] - clock["start"]))}
        return summarize(args, injection, received, states, stuck, keys,
                         [b - a for a, b in zip(clock["cpu_before"], cpu_after)], window, peak_rss,
                         log_counts, log_examples, complete, phases)
    finally:
        with signals_ignored():  # a second Ctrl-C must not leave the cluster behind; each step is bounded
            if daemon is not None:
                submit.stop_daemon(daemon)
            if sink is not None:
                sink.stop()
            if args.daemon_log and log_path.exists():
                shutil.copyfile(log_path, args.daemon_log)
            try:
                cluster.stop("fast", timeout_s=60)
            finally:
                if cluster.home != cluster.root and cluster.home.name.startswith("pg-"):
                    shutil.rmtree(cluster.home, ignore_errors=True)  # a fall-back home outside workdir
                shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def signals_ignored():
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all CPUs, every process and the kernel), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal_guest = sum(ticks[7:])  # steal, and guest time already counted in user
    return (sum(ticks) - idle - steal_guest) / submit.CLOCK_TICKS


def cores(before: tuple[float, ...], after: tuple[float, ...], seconds: float) -> dict[str, float]:
    """Average cores busy per process group between two read_cpu() readings `seconds` apart."""
    names = ("daemon", "postgres", "injector", "sink", "machine")
    return {name: round((b - a) / seconds, 2) if seconds > 0 else None for name, a, b in zip(names, before, after)}


def summarize(args, injection: Injection, received: dict, states: dict[str, int], stuck: list[dict],
              keys: list[DomainKey], cpu: list[float], window: float, peak_rss: float,
              log_counts: Counter, log_examples: list[str], complete: bool, phases: dict) -> dict:
    """The result row; values the sink cannot give (smtp-sink: no headers seen) are None."""
    accepted = len(injection.queue_ids)
    problems: list[str] = []
    expected_signatures = len(keys)
    p50 = p95 = p99 = dkim_pct = None
    duplicates = 0
    timeline: list[dict] = []
    dkim_note = "not checked (smtp-sink does not show the messages)"
    if args.sink == "aiosmtpd":
        ids = received.get("ids", [])
        arrivals = received.get("arrivals", [])
        sent = received.get("sent", [])
        delivered_count = len(set(i for i in ids if i is not None))
        duplicates = len(ids) - delivered_count
        last_arrival = max(arrivals, default=None)
        latencies = sorted(a - s for a, s in zip(arrivals, sent) if s is not None)
        if latencies:
            p50, p95, p99 = (round(submit.percentile_ms(latencies, pct), 1) for pct in (50, 95, 99))
        signatures = received.get("dkim", [])
        if signatures:
            dkim_pct = round(100 * sum(n >= expected_signatures for n in signatures) / len(signatures), 2)
            if dkim_pct < 100:
                problems.append(f"only {dkim_pct}% of the messages carry {expected_signatures} DKIM signature(s)")
        verified, sample_problems = verify_samples(received.get("samples", []), keys)
        problems += sample_problems
        dkim_note = (f"{verified} DKIM signature(s) of {len(received.get('samples', []))} sampled messages "
                     f"verified with dkimpy")
        if duplicates:
            problems.append(f"the sink received {duplicates} duplicate deliveries")
        if None in ids:
            problems.append("the sink received messages without an X-Bench-Id header")
        timeline = per_second(injection.first_sent, [s for s in sent if s is not None], arrivals)
    else:
        delivered_count = received.get("count", 0)
        last_arrival = received.get("last") or None
    e2e = last_arrival - injection.first_sent if last_arrival and injection.first_sent else None
    per_1k = 1000 / accepted if accepted else 0.0
    if injection.timed_out:
        problems.append(f"injection stopped by --time-limit {args.time_limit:g}s after {accepted} messages "
                        f"(messages in flight may be stored and delivered without their 250 reaching a client)")
    if injection.refused:
        problems.append(f"refused at submission: {dict(injection.refused)}")
    if not complete:
        problems.append(f"--time-limit {args.time_limit:g}s ran out with {delivered_count} of {accepted} "
                        f"accepted messages at the sink")
    elif delivered_count != accepted and not injection.timed_out:
        problems.append(f"the sink received {delivered_count} distinct messages, {accepted} were accepted")
    undelivered = sum(n for state, n in states.items() if state != "delivered")
    if undelivered or (states.get("delivered", 0) != accepted and not injection.timed_out):
        problems.append(f"recipient states in PostgreSQL: {states} (expected {accepted} delivered)")
        problems += [f"  not delivered: {row}" for row in stuck]
    if log_counts:
        problems.append("the daemon logged warnings/errors: " +
                        ", ".join(f"{level} {event} x{n}" for (level, event), n in log_counts.most_common()))
        problems += [f"  {line}" for line in log_examples]
    busy = {"whole": cores((0.0,) * len(cpu), tuple(cpu), window), **phases}
    return {
        "messages": args.messages, "clients": args.clients, "domains": args.domains, "size": args.size,
        "dkim": "rsa+ed25519" if args.dual else "rsa", "sink": args.sink, "pool_size": args.pool_size,
        "accepted": accepted, "delivered": delivered_count, "duplicates": duplicates,
        "states": states, "inject_s": round(injection.elapsed, 2),
        "injected_msg_per_s": round(accepted / injection.elapsed, 1) if injection.elapsed else None,
        "e2e_s": round(e2e, 2) if e2e else None,
        "delivered_msg_per_s": round(delivered_count / e2e, 1) if e2e and e2e > 0 else None,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "dkim_signed_pct": dkim_pct, "dkim_check": dkim_note,
        "daemon_cpu_s_per_1k": round(cpu[0] * per_1k, 2), "postgres_cpu_s_per_1k": round(cpu[1] * per_1k, 2),
        "injector_cpu_s_per_1k": round(cpu[2] * per_1k, 2), "sink_cpu_s_per_1k": round(cpu[3] * per_1k, 2),
        "daemon_peak_rss_mb": round(peak_rss, 1), "window_s": round(window, 2),
        "machine_cores_busy": busy["whole"]["machine"], "cores_busy": busy,
        "sink_transactions": received.get("transactions"), "timeline": timeline,
        "ok": not problems, "problems": problems,
    }


def per_second(origin: float, sent: list[float], arrivals: list[float]) -> list[dict]:
    """Messages injected (by their stamp) and arrived at the sink in each second after `origin`."""
    if not arrivals:
        return []
    seconds = int(max(max(arrivals), max(sent, default=origin)) - origin) + 1
    injected, arrived = [0] * seconds, [0] * seconds
    for stamp in sent:
        injected[min(seconds - 1, max(0, int(stamp - origin)))] += 1
    for stamp in arrivals:
        arrived[min(seconds - 1, max(0, int(stamp - origin)))] += 1
    return [{"second": n, "injected": injected[n], "arrived": arrived[n]} for n in range(seconds)]


# -- report -----------------------------------------------------------------------------------------

COLUMNS = [("messages", "messages"), ("clients", "clients"), ("dkim", "DKIM"), ("sink", "sink"),
           ("injected_msg_per_s", "injected msg/s"), ("delivered_msg_per_s", "delivered msg/s (e2e)"),
           ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("dkim_signed_pct", "signed %"),
           ("daemon_cpu_s_per_1k", "daemon CPU s/1k"), ("postgres_cpu_s_per_1k", "PG CPU s/1k"),
           ("injector_cpu_s_per_1k", "injector CPU s/1k"), ("sink_cpu_s_per_1k", "sink CPU s/1k"),
           ("daemon_peak_rss_mb", "daemon peak RSS MB"), ("machine_cores_busy", "machine cores busy")]


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join("n/a" if result[key] is None else str(result[key]) for key, _ in COLUMNS) + " |"
              for result in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = submit.machine()
    print(f"machine: nproc {info['nproc']}, Python {info['python']}, {info['platform']}")
    print(f"load: {args.messages} messages of {args.size} bytes, 1 recipient each over {args.domains} "
          f"Zipf-skewed domains, {args.clients} clients (STARTTLS + AUTH), DKIM "
          f"{'rsa-sha256 + ed25519-sha256' if args.dual else 'rsa-sha256'}, sink {args.sink} on 127.0.0.1; "
          f"durable PostgreSQL", flush=True)
    result = run(args)
    print()
    print(markdown_table([result]))
    print()
    print(f"end to end: {result['delivered']} of {result['accepted']} accepted messages at the sink "
          f"{result['e2e_s']}s after the first injection (the injection took {result['inject_s']}s)"
          + (f"; {result['sink_transactions']} SMTP transactions" if result["sink_transactions"] else ""))
    print(f"recipients in PostgreSQL: {result['states']}")
    print(f"DKIM: {result['dkim_check']}")
    print(f"average cores busy (of {info['nproc']}): daemon / PostgreSQL / injector / sink / whole machine")
    for phase, busy in result["cores_busy"].items():
        print(f"  {phase:9} {busy['daemon']} / {busy['postgres']} / {busy['injector']} / {busy['sink']} / "
              f"{busy['machine']}")
    if args.timeline and result["timeline"]:
        print()
        print("| second | injected | arrived at the sink |")
        print("|---:|---:|---:|")
        for row in result["timeline"]:
            print(f"| {row['second']} | {row['injected']} | {row['arrived']} |")
    for problem in result["problems"]:
        print(f"FAIL: {problem}" if not problem.startswith("  ") else problem)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
    return 0 if result["ok"] else 1


def _sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does: whichever SIGINT handler is current runs (asyncio.Runner's cancels the
    running coroutine cleanly; outside it, KeyboardInterrupt), so the finally blocks clean up."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)


if __name__ == "__main__":
    # Ctrl-C (even when started by a shell that ignores SIGINT in background jobs) and SIGTERM both unwind
    # through the finally blocks, which stop the sink, the daemon and the cluster and remove the temp dirs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; sink, daemon and cluster stopped, temp dirs removed", file=sys.stderr)
        sys.exit(130)

"""End-to-end relay benchmark: submission -> DKIM signing -> delivery to a remote SMTP server.

Run:
    .venv/bin/python benchmarks/deliver.py --messages 5000 --clients 20
    .venv/bin/python benchmarks/deliver.py --messages 3000 --clients 20 --dual --json /tmp/deliver.json
    .venv/bin/python benchmarks/deliver.py --sink smtp-sink        # Postfix's smtp-sink: throughput only
    .venv/bin/python benchmarks/deliver.py --messages 3000 --clients 20 --unsubscribe 200   # one-click under load

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

With `--unsubscribe K` the workload also checks RFC 8058 one-click unsubscribes under load. K addresses get
`--repeat` (5) messages each, interleaved with the other mail and `--repeat-gap` messages apart (default: spread
over the whole injection). The sink reports the first copy to each of them at once, with the link of its
`List-Unsubscribe` header, and a thread of this process POSTs `List-Unsubscribe=One-Click` to that link (only
loopback links are posted) as a mail client would, recording the latency and the time.time() at which the 200
came back. Afterwards: deliveries after unsubscribe = messages for an unsubscribed address whose MAIL FROM
reached the sink (the sink's time.time(): same machine, same clock) after that 200 (must be 0); copies already
in flight (MAIL FROM before the 200, arrival after it) are counted apart, like the attempts in flight at a crash; the
unsubscribed addresses' copies by state (delivered, cancelled, suppressed) and by how they were stopped (events:
cancelled in the unsubscribe's transaction, dropped by the runner after it had leased them, suppressed at
submission or at claim); the endpoint latency p50/p95/p99/max. Every other recipient must still be `delivered`;
the unsubscribed addresses' may be `cancelled` or `suppressed`. Every message must carry the one-click headers.
The unsubscriber's thread counts as injector CPU.

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
from urllib.parse import urlsplit

import aiohttp
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
    parser.add_argument("--unsubscribe", type=int, default=0, metavar="K",
                        help="K addresses get --repeat messages each and unsubscribe (one-click POST) as soon as "
                             "their first copy reaches the sink (default 0)")
    parser.add_argument("--repeat", type=int, default=5, metavar="R",
                        help="messages to each --unsubscribe address, spread over the injection (default 5)")
    parser.add_argument("--repeat-gap", type=int, metavar="M",
                        help="messages injected between two copies to one --unsubscribe address (default "
                             "--messages / --repeat: spread over the whole injection; small: copies close together)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.domains < 1 or args.size < 1024 or args.time_limit <= 0:
        parser.error("need --messages >= 1, --domains >= 1, --size >= 1024, --time-limit > 0")
    if args.pool_size is not None and args.pool_size < 2:
        parser.error("--pool-size must be at least 2")
    if not 1 <= args.clients <= 500:
        parser.error("--clients must be between 1 and 500")
    if args.sink == "smtp-sink" and not smtp_sink_path():
        parser.error("--sink smtp-sink needs Postfix's smtp-sink (make setup installs it)")
    if args.unsubscribe < 0 or args.repeat < 2:
        parser.error("need --unsubscribe >= 0 and --repeat >= 2")
    if args.unsubscribe and args.unsubscribe * args.repeat > args.messages:
        parser.error("--unsubscribe K needs K x --repeat <= --messages")
    if args.repeat_gap is None:
        args.repeat_gap = max(1, args.messages // args.repeat)
    if args.unsubscribe and not 1 <= args.repeat_gap <= args.messages // args.repeat:
        parser.error("--repeat-gap must be between 1 and --messages / --repeat")
    if args.unsubscribe and args.sink != "aiosmtpd":
        parser.error("--unsubscribe needs the aiosmtpd sink (smtp-sink does not show the List-Unsubscribe link)")
    return args


# -- the messages -----------------------------------------------------------------------------------

def recipient_domains(count: int, domains: int, seed: int) -> list[str]:
    """One recipient domain per message; domain k (1-based) has weight 1/k, so a few get most of the mail."""
    names = [f"rcpt{k:03d}.example" for k in range(1, domains + 1)]
    return random.Random(seed).choices(names, weights=[1 / k for k in range(1, domains + 1)], k=count)


def recipients_of(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the recipient of each message, the addresses that will unsubscribe).

    Message i goes to `reader{i}`, except that each of the `--unsubscribe` K addresses `fan{k}` gets `--repeat`
    R messages, `--repeat-gap` G messages apart: address k's first copy is message k * (N - (R-1) G) // K, so
    the first copies are spread evenly over the part of the run that leaves room for the later ones, and the
    copies interleave with other mail. A slot already taken moves the copy to the next free message. With the
    default G = N // R every address gets one copy in each R-th of the run."""
    domains = recipient_domains(args.messages, args.domains, args.seed)
    recipients = [f"reader{index}@{domains[index]}" for index in range(args.messages)]
    watched: list[str] = []
    taken = [False] * args.messages
    span = args.messages - (args.repeat - 1) * args.repeat_gap
    for k in range(args.unsubscribe):
        first = k * span // args.unsubscribe
        address = f"fan{k}@{domains[first]}"
        watched.append(address)
        for copy in range(args.repeat):
            slot = first + copy * args.repeat_gap
            while taken[slot % args.messages]:  # K x R <= N: a free slot exists
                slot += 1
            taken[slot % args.messages] = True
            recipients[slot % args.messages] = address
    return recipients, watched


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

# Runs as `python -c SINK_SCRIPT RESULT_FILE PROGRESS_FILE MAX_SECONDS SAMPLES WATCH_FILE` (its life is
# lean_smtp.serve_recording's, shared with the lean sink): binds 127.0.0.1:0,
# prints the port, answers 250 to everything, rewrites PROGRESS_FILE ("count last-arrival") every 0.1 s, and on
# SIGTERM/SIGINT (or after MAX_SECONDS: a safety net should this script die without stopping it) writes
# RESULT_FILE. Headers are found with regular expressions on the raw bytes: no email parsing per message.
# For the first copy to each address listed in WATCH_FILE (may be empty) it prints one JSON line at once:
# {"rcpt", "arrival", "url"}, the URL being that copy's List-Unsubscribe http(s) link.
# All stamps are time.time(), as in the benchmark's process: the same clock on the same machine.
SINK_SCRIPT = r'''
import base64, json, logging, re, sys, time
from aiosmtpd.smtp import SMTP
sys.path.insert(0, @BENCHMARKS@)
from lean_smtp import run_on_fastest_loop, serve_recording

result_path, progress_path, max_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
SAMPLES = int(sys.argv[4])
WATCH = set(open(sys.argv[5]).read().split()) if len(sys.argv) > 5 and sys.argv[5] else set()
logging.getLogger("mail.log").setLevel(logging.CRITICAL)
SENT = re.compile(rb"^X-Bench-Sent:[ \t]*([0-9.]+)", re.M | re.I)
ID = re.compile(rb"^X-Bench-Id:[ \t]*(-?[0-9]+)", re.M | re.I)
DKIM = re.compile(rb"^DKIM-Signature:", re.M | re.I)
UNSUB = re.compile(rb"^List-Unsubscribe:[^\r\n]*?<(https?://[^>\s]+)>", re.M | re.I)
ONE_CLICK = re.compile(rb"^List-Unsubscribe-Post:[ \t]*List-Unsubscribe=One-Click[ \t]*\r?$", re.M | re.I)
arrivals, sent, ids, dkim, samples = [], [], [], [], []
rcpts, mail_at, unsub_urls, one_click = [], [], [], []
first_seen = set()
transactions = 0

class Handler:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address  # what aiosmtpd does without this hook
        envelope.mail_options.extend(mail_options)
        envelope.bench_mail_at = time.time()  # the start of this delivery attempt
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        global transactions
        now = time.time()
        content = envelope.original_content or envelope.content
        end = content.find(b"\r\n\r\n")
        head = content if end < 0 else content[:end + 2]
        m_sent, m_id, m_unsub = SENT.search(head), ID.search(head), UNSUB.search(head)
        url = m_unsub.group(1).decode("ascii", "replace") if m_unsub else None
        post = ONE_CLICK.search(head) is not None
        transactions += 1
        for rcpt in envelope.rcpt_tos:  # one record per recipient delivered in this transaction
            arrivals.append(now)
            sent.append(float(m_sent.group(1)) if m_sent else None)
            ids.append(int(m_id.group(1)) if m_id else None)
            dkim.append(len(DKIM.findall(head)))
            rcpts.append(rcpt.lower())
            mail_at.append(getattr(envelope, "bench_mail_at", None))
            unsub_urls.append(url)
            one_click.append(post)
            if rcpt.lower() in WATCH and rcpt.lower() not in first_seen:
                first_seen.add(rcpt.lower())
                sys.stdout.write(json.dumps({"rcpt": rcpt.lower(), "arrival": now, "url": url}) + "\n")
                sys.stdout.flush()
        if len(samples) < SAMPLES:
            samples.append(base64.b64encode(content).decode())
        return "250 2.0.0 Ok: queued"

handler = Handler()
run_on_fastest_loop(serve_recording(
    lambda: SMTP(handler, hostname="sink.bench", ident="bench sink"), result_path, progress_path, max_seconds,
    lambda: (len(arrivals), arrivals[-1] if arrivals else 0),
    lambda: {"arrivals": arrivals, "sent": sent, "ids": ids, "dkim": dkim, "samples": samples,
             "transactions": transactions, "rcpts": rcpts, "mail_at": mail_at, "unsub_urls": unsub_urls,
             "one_click": one_click}))
'''


class AiosmtpdSink:
    """The aiosmtpd sink process; `received()` reads its progress file, `stop()` returns its records.

    With `watch` addresses, a thread reads the sink's stdout and calls `on_first_copy(line)` (a dict: rcpt,
    arrival, url) as soon as the first copy to one of them has arrived."""

    def __init__(self, workdir: Path, max_seconds: float, watch: list[str] = (),
                 on_first_copy=None) -> None:
        self.result_path = workdir / "sink-result.json"
        self.progress_path = workdir / "sink-progress"
        watch_path = ""
        if watch:
            watch_path = str(workdir / "sink-watch")
            Path(watch_path).write_text("".join(f"{address.lower()}\n" for address in watch))
        with (workdir / "sink.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SINK_SCRIPT.replace("@BENCHMARKS@", repr(str(Path(__file__).parent))),
                 str(self.result_path), str(self.progress_path),
                 str(max_seconds), str(SAMPLES), watch_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True)  # Ctrl-C reaches us only; we stop it ourselves
        self.port = int(_read_line(self.proc, SINK_READY_TIMEOUT_S, workdir / "sink.log"))
        self._first_copies = None
        if on_first_copy is not None:
            self._first_copies = threading.Thread(target=self._read_first_copies, args=(on_first_copy,),
                                                  daemon=True, name="sink-first-copies")
            self._first_copies.start()

    def _read_first_copies(self, on_first_copy) -> None:
        for line in self.proc.stdout:  # ends when the sink exits and closes its stdout
            try:
                on_first_copy(json.loads(line))
            except ValueError:
                continue

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
    text = config.read_text()
    # submit.py turns delivery off in its own [delivery] section; TOML forbids a second one, so drop it.
    text = re.sub(r"(?m)^\[delivery\]\n(?:(?!\[).*\n)*", "", text)
    if "[http]" not in text:  # the one-click unsubscribe endpoint: a port of its own, not the default 8025
        text += '\n[http]\nlisten = ["127.0.0.1:0"]\n'
    if pool_size:
        url_line = f"url = {q(db_url)}\n"
        assert url_line in text, "submit.write_config changed its [database] section"
        text = text.replace(url_line, f"{url_line}pool_max_size = {pool_size}\n", 1)
    config.write_text(text)
    shaping = workdir / "shaping.toml"
    shaping.write_text(SHAPING)
    with config.open("a") as out:
        out.write(f"""
[dkim]
key_dir = {q(str(workdir / "dkim"))}

[delivery]
enabled = true
routes = {{ "*" = {q(f"127.0.0.1:{sink_port}")} }}
shaping_file = {q(str(shaping))}
""")
    return config


# -- the injection ----------------------------------------------------------------------------------

@dataclass
class Injection:
    queue_ids: list[str] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # reply code (or exception name) -> count
    suppressed: int = 0  # accepted with "recipients suppressed": stored, never attempted (an earlier unsubscribe)
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
            result.queue_ids.append(m.group(1).rstrip(";") if (m := submit.QUEUED_AS.search(reply)) else "?")
            result.suppressed += "suppressed" in reply
    except aiosmtplib.SMTPResponseException as exc:
        result.refused[str(exc.code)] += 1
    except aiosmtplib.SMTPRecipientsRefused as exc:
        result.refused[str(exc.recipients[0].code)] += 1
    except (aiosmtplib.SMTPException, OSError) as exc:
        result.refused[type(exc).__name__] += 1
        await client.close()


async def inject(port: int, args: argparse.Namespace, recipients: list[str], on_connected) -> Injection:
    """Connect and authenticate every client (not timed), call `on_connected`, then send all messages."""
    body = sized_body(args.size)
    clients = [submit.Client(port) for _ in range(args.clients)]
    result = Injection()
    try:
        async with asyncio.timeout(submit.SETUP_TIMEOUT_S):
            await asyncio.gather(*(client.open() for client in clients))
        on_connected()
        work = iter(range(args.messages))

        async def worker(client: submit.Client) -> None:
            for index in work:
                await send_one(client, index, recipients[index], body, result)
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


# -- the unsubscribes -------------------------------------------------------------------------------

UNSUBSCRIBE_TIMEOUT_S = 30  # per POST; and how long the last POSTs may take once the sink has everything
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass
class Unsubscribe:
    address: str
    url: str | None
    arrival: float  # time.time() at the sink: its first copy arrived (the sink's clock is this machine's)
    posted: float | None = None  # time.time() just before the POST was sent
    answered: float | None = None  # time.time() when the response status line and headers were in
    latency_s: float | None = None  # perf_counter() from `posted` to `answered`
    status: int | None = None
    error: str = ""


class Unsubscriber:
    """Clicks "unsubscribe" like a mail client: POST `List-Unsubscribe=One-Click` (RFC 8058) to the link of the
    first copy each watched address received. Its own thread and event loop, so the POSTs neither wait for the
    injector's loop nor delay it; `submit` is called from the sink's stdout reader thread."""

    def __init__(self) -> None:
        self.records: dict[str, Unsubscribe] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="unsubscriber")

    def start(self) -> "Unsubscriber":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the unsubscriber's event loop did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0)  # no client-side queue in front of the POSTs being timed
        async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=UNSUBSCRIBE_TIMEOUT_S)) as session:
            self._session = session
            self._ready.set()
            await self._stop.wait()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=UNSUBSCRIBE_TIMEOUT_S)
            for task in self._tasks:
                task.cancel()

    def submit(self, first_copy: dict) -> None:
        """A first copy arrived at the sink (called from another thread)."""
        try:
            self._loop.call_soon_threadsafe(self._start, first_copy)
        except RuntimeError:  # the loop is closed: the run is over
            pass

    def _start(self, first_copy: dict) -> None:
        if first_copy["rcpt"] in self.records or self._stop.is_set():
            return
        record = Unsubscribe(first_copy["rcpt"], first_copy.get("url"), first_copy["arrival"])
        self.records[record.address] = record
        task = self._loop.create_task(self._post(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, record: Unsubscribe) -> None:
        if not record.url:
            record.error = "no List-Unsubscribe http(s) link in the first copy"
            return
        if urlsplit(record.url).hostname not in LOOPBACK_HOSTS:  # the benchmark stays on loopback
            record.error = f"not a loopback link, not posted: {record.url}"
            return
        record.posted = time.time()
        started = time.perf_counter()
        try:
            async with self._session.post(record.url, data={"List-Unsubscribe": "One-Click"}) as response:
                record.latency_s = time.perf_counter() - started
                record.answered = time.time()
                record.status = response.status
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"

    def busy(self) -> int:
        """POSTs not finished (a racy read from another thread: enough to poll until it is 0)."""
        return len(self._tasks)

    def finish(self, expected: int, timeout_s: float) -> None:
        """Wait (bounded) until `expected` addresses had their POST started and all POSTs are done, then stop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (len(self.records) < expected or self.busy()):
            time.sleep(0.02)
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(UNSUBSCRIBE_TIMEOUT_S + 5)


# -- waiting and checking ---------------------------------------------------------------------------

def wait_for_sink(sink, daemon: subprocess.Popen, expected: int, deadline: float, never_sent=None) -> bool:
    """Until the sink has `expected` messages or the deadline (time.monotonic()); progress on stderr.

    `never_sent()`, if given, counts recipients that will never reach the sink (cancelled or suppressed by an
    unsubscribe; polled every 0.5 s): the sink is complete when it has `expected` minus those."""
    next_report = time.monotonic() + 5
    next_poll, not_coming = time.monotonic(), 0
    while time.monotonic() < deadline:
        count, _ = sink.received()
        if count + not_coming >= expected:
            return True
        if never_sent is not None and time.monotonic() >= next_poll:
            not_coming = never_sent()
            next_poll = time.monotonic() + 0.5
            if count + not_coming >= expected:
                return True
        for name, proc in (("the sink", sink.proc), ("mtad", daemon)):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} with {count}/{expected} messages at the sink")
        if time.monotonic() >= next_report:
            print(f"  sink has {count}/{expected - not_coming}", file=sys.stderr, flush=True)
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


NEVER_SENT = ("cancelled", "suppressed")  # what an unsubscribe leaves of a recipient's pending mail


async def never_sent(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval("SELECT count(*) FROM recipients WHERE state = ANY($1::text[])", NEVER_SENT)
    finally:
        await conn.close()


async def wait_for_delivered(url: str, expected: int, timeout_s: float, unsubscribing: bool = False) -> dict[str, int]:
    """Poll until `expected` recipients are `delivered` (the outcome writer commits in batches); with
    `unsubscribing`, `cancelled` and `suppressed` ones count as finished too (summarize checks whose they are)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = await recipient_states(url)
        finished = states.get("delivered", 0) + (sum(states.get(s, 0) for s in NEVER_SENT) if unsubscribing else 0)
        if finished >= expected or time.monotonic() >= deadline:
            return states
        await asyncio.sleep(0.1)


async def unsubscribed_rows(url: str, addresses: list[str]) -> dict:
    """What PostgreSQL holds for the unsubscribing addresses: recipient states per address, how their copies
    ended up not sent (events), and the suppressions and `unsubscribed` events written."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        states = await conn.fetch(
            "SELECT lower(address) AS address, state, count(*) AS n FROM recipients "
            "WHERE lower(address) = ANY($1::text[]) GROUP BY 1, 2", addresses)
        how = await conn.fetch(
            "SELECT e.kind, coalesce(e.reply, '') AS reply, count(*) AS n FROM events e "
            "JOIN recipients r ON r.id = e.recipient_id "
            "WHERE e.kind IN ('cancelled', 'suppressed') AND lower(r.address) = ANY($1::text[]) "
            "GROUP BY 1, 2 ORDER BY 1, 2", addresses)
        suppressions = await conn.fetchval("SELECT count(*) FROM suppressions WHERE reason = 'unsubscribed'")
        events = await conn.fetchval("SELECT count(*) FROM events WHERE kind = 'unsubscribed'")
    finally:
        await conn.close()
    per_address: dict[str, Counter] = {}
    for row in states:
        per_address.setdefault(row["address"], Counter())[row["state"]] += row["n"]
    return {"states": per_address, "how": [(r["kind"], r["reply"], r["n"]) for r in how],
            "suppressions": suppressions, "unsubscribed_events": events}


async def stuck_recipients(url: str, excused: list[str] = (), limit: int = 5) -> list[dict]:
    """Recipients not delivered, but for the `excused` addresses' (unsubscribed) cancelled or suppressed ones."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT m.queue_id, r.address, r.state, r.attempts, r.last_code, r.last_reply FROM recipients r "
            "JOIN messages m ON m.id = r.message_id WHERE r.state <> 'delivered' "
            "AND NOT (r.state = ANY($2::text[]) AND lower(r.address) = ANY($3::text[])) ORDER BY r.id LIMIT $1",
            limit, NEVER_SENT, list(excused))
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


def daemon_unsubscribes(log_path: Path) -> tuple[int, int]:
    """(`unsubscribe` events in the daemon's log, the sum of their `cancelled` counts)."""
    events = cancelled = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if '"unsubscribe"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "unsubscribe":
            events += 1
            cancelled += int(entry.get("cancelled") or 0)
    return events, cancelled


HOW_NOT_SENT = {  # (event kind, reply) of a watched address's copy that was never sent -> how it happened
    ("cancelled", "recipient unsubscribed"): "cancelled_by_unsubscribe",  # queued/deferred: the POST's transaction
    ("cancelled", ""): "dropped_after_lease",  # leased already; the runner dropped it (NOTIFY mtad_suppressed)
    ("suppressed", "suppressed: unsubscribed"): "suppressed_at_submission",  # submitted after the unsubscribe
    ("suppressed", "suppressed after it was queued"): "suppressed_at_claim",
}


def check_unsubscribes(watched: list[str], records: dict[str, Unsubscribe], received: dict, db: dict,
                       log_path: Path) -> tuple[dict, list[str], list[str]]:
    """The unsubscribe part of the result: (fields, problems, addresses whose POST got 200).

    A delivery after unsubscribe is a message that reached the sink for an address whose POST got 200, with
    an arrival stamp later than the time.time() at which that 200 came back (both stamps are time.time() on
    this machine: the sink's in its process, the 200's in this one)."""
    problems: list[str] = []
    done = {address: r for address, r in records.items() if r.status == 200}
    failed = [r for r in records.values() if r.status != 200]
    if len(records) < len(watched):
        problems.append(f"{len(watched) - len(records)} of {len(watched)} unsubscribing addresses got no first "
                        f"copy at the sink, so no unsubscribe")
    if failed:
        problems.append(f"{len(failed)} unsubscribe POSTs did not get 200: " + "; ".join(
            f"{r.address}: {r.status if r.status is not None else r.error}" for r in failed[:5]))
    after: list[dict] = []
    during = 0  # arrived while the POST was in flight: neither before nor after it, not counted
    for rcpt, arrival, attempt in zip(received.get("rcpts", []), received.get("arrivals", []),
                                      received.get("mail_at", [])):
        record = done.get(rcpt)
        if record is None:
            continue
        if arrival > record.answered:
            # When did that attempt start (its MAIL FROM at the sink)? Before the POST was sent it was in
            # flight already; after the 200 it began although the unsubscribe was committed.
            started = ("unknown" if attempt is None else "before_post" if attempt < record.posted
                       else "during_post" if attempt <= record.answered else "after_200")
            after.append({"address": rcpt, "after_200_ms": round((arrival - record.answered) * 1000, 1),
                          "mail_from": started, "post_ms": round(record.latency_s * 1000, 1),
                          "mail_from_after_200_ms": None if attempt is None else
                          round((attempt - record.answered) * 1000, 1)})
        elif arrival > record.posted:
            during += 1
    # A copy whose MAIL FROM went out before the 200 was in flight when the unsubscribe was processed (like
    # the attempts in flight at a crash); one that *started* after the 200 is mail sent after leaving.
    in_flight = [a for a in after if a["mail_from"] in ("before_post", "during_post")]
    after = [a for a in after if a not in in_flight]
    if after:
        starts = Counter(a["mail_from"] for a in after)
        problems.append(f"{len(after)} deliveries after unsubscribe (started after the POST's 200); "
                        f"their MAIL FROM came {dict(starts)} (relative to the POST): " +
                        ", ".join(f"{a['address']} +{a['after_200_ms']} ms" for a in after[:5]))
    states: dict[str, Counter] = db["states"]
    total = Counter()
    for address in done:
        total.update(states.get(address, Counter()))
    how = Counter()
    for kind, reply, n in db["how"]:
        how[HOW_NOT_SENT.get((kind, reply), f"{kind}: {reply or '(no reply)'}")] += n
    latencies = sorted(r.latency_s for r in done.values())
    reaction = sorted(r.posted - r.arrival for r in done.values())  # sink arrival -> POST sent (this harness)
    log_events, log_cancelled = daemon_unsubscribes(log_path)
    if log_events != len(done):
        problems.append(f"the daemon logged {log_events} unsubscribe events for {len(done)} POSTs answered 200")
    if how["cancelled_by_unsubscribe"] != log_cancelled:
        problems.append(f"the daemon's unsubscribe events say {log_cancelled} copies cancelled, the events table "
                        f"{how['cancelled_by_unsubscribe']}")
    if db["suppressions"] != len(done):
        problems.append(f"{db['suppressions']} 'unsubscribed' suppressions for {len(done)} unsubscribes")

    def ms(values: list[float], pct: float) -> float | None:
        return round(submit.percentile_ms(values, pct), 1) if values else None

    fields = {
        "unsubscribed": len(done),
        "unsub_cancelled": total["cancelled"],
        "after_unsubscribe": len(after),
        "unsub_p50_ms": ms(latencies, 50), "unsub_p95_ms": ms(latencies, 95), "unsub_p99_ms": ms(latencies, 99),
        "unsub_max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        "unsubscribe": {
            "addresses": len(watched), "posted": sum(r.posted is not None for r in records.values()),
            "answered_200": len(done), "failed": len(failed),
            "copies": dict(total),  # recipient states of the unsubscribed addresses' copies
            "not_sent_by": dict(how),
            "addresses_with_copies_cancelled": sum(states.get(a, Counter())["cancelled"] > 0 for a in done),
            "addresses_with_copies_not_sent": sum(
                sum(states.get(a, Counter())[s] for s in NEVER_SENT) > 0 for a in done),
            "deliveries_after": after, "arrived_during_post": during,
            "in_flight_at_unsubscribe": len(in_flight),
            "latency_ms": {"p50": ms(latencies, 50), "p95": ms(latencies, 95), "p99": ms(latencies, 99),
                           "max": round(latencies[-1] * 1000, 1) if latencies else None},
            "reaction_ms": {"p50": ms(reaction, 50), "max": round(reaction[-1] * 1000, 1) if reaction else None},
            "daemon_log": {"events": log_events, "cancelled": log_cancelled},
            "suppressions": db["suppressions"], "unsubscribed_events": db["unsubscribed_events"],
        },
    }
    return fields, problems, sorted(done)


# -- one run ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mtad-bench-deliver-"))
    os.chmod(workdir, 0o755)  # as root the server runs as `postgres`, which must traverse to its directory
    cluster = EmbeddedPostgres(workdir / "pg", durable=True)
    daemon: subprocess.Popen | None = None
    sink = None
    unsubscriber: Unsubscriber | None = None
    log_path = workdir / "mtad.log"
    recipients, watched = recipients_of(args)
    try:
        cluster.start(timeout_s=60)
        url = cluster.url()
        submit.run_async(submit.prepare_database(url))
        keys = write_keys(workdir / "dkim", args.dual)
        if watched:
            unsubscriber = Unsubscriber().start()
        if args.sink == "aiosmtpd":
            sink = AiosmtpdSink(workdir, args.time_limit + 300, watched, unsubscriber.submit if unsubscriber else None)
        else:
            sink = PostfixSink(workdir, args.time_limit + 300)
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
        injection = submit.run_async(inject(port, args, recipients, on_connected))
        clock["cpu_injected"], clock["injected"] = read_cpu(), time.monotonic()
        accepted = len(injection.queue_ids)
        print(f"injected {accepted} in {injection.elapsed:.1f}s; waiting for the sink...", file=sys.stderr, flush=True)
        complete = wait_for_sink(sink, daemon, accepted, clock["start"] + args.time_limit,
                                 (lambda: submit.run_async(never_sent(url))) if watched else None)
        if unsubscriber is not None:  # the last first copies may still be on their way to a POST
            unsubscriber.finish(len(watched) if complete else 0, UNSUBSCRIBE_TIMEOUT_S)
        states = submit.run_async(wait_for_delivered(url, accepted, DB_SETTLE_TIMEOUT_S if complete else 1,
                                                     unsubscribing=bool(watched)))
        cpu_after = read_cpu()
        window = time.monotonic() - clock["start"]
        if daemon.poll() is not None:
            raise RuntimeError(f"mtad exited with {daemon.returncode} during the run")
        peak_rss = submit.peak_rss_mb(daemon_pid)
        excused = sorted(a for a, r in unsubscriber.records.items() if r.status == 200) if unsubscriber else []
        stuck = (submit.run_async(stuck_recipients(url, excused))
                 if states.get("delivered", 0) != sum(states.values()) else [])
        db_unsubscribed = submit.run_async(unsubscribed_rows(url, [a.lower() for a in watched])) if watched else None
        received = sink.stop()
        log_counts, log_examples = daemon_log_problems(log_path)
        unsub = (check_unsubscribes([a.lower() for a in watched], unsubscriber.records, received, db_unsubscribed,
                                    log_path) if unsubscriber else None)
        phases = {"injection": cores(clock["cpu_before"], clock["cpu_injected"], clock["injected"] - clock["start"]),
                  "drain": cores(clock["cpu_injected"], cpu_after, window - (clock["injected"] - clock["start"]))}
        return summarize(args, injection, received, states, stuck, keys,
                         [b - a for a, b in zip(clock["cpu_before"], cpu_after)], window, peak_rss,
                         log_counts, log_examples, complete, phases, unsub)
    finally:
        with signals_ignored():  # a second Ctrl-C must not leave the cluster behind; each step is bounded
            if unsubscriber is not None:
                unsubscriber.stop()
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
              log_counts: Counter, log_examples: list[str], complete: bool, phases: dict,
              unsub: tuple[dict, list[str], list[str]] | None = None) -> dict:
    """The result row; values the sink cannot give (smtp-sink: no headers seen) are None."""
    accepted = len(injection.queue_ids)
    problems: list[str] = []
    expected_signatures = len(keys)
    p50 = p95 = p99 = dkim_pct = one_click_pct = None
    # Copies of unsubscribed addresses that were never sent (cancelled, suppressed): expected, not missing.
    unsub_fields, unsub_problems, unsubscribed = unsub if unsub else ({}, [], [])
    excused = sum(n for state, n in unsub_fields.get("unsubscribe", {}).get("copies", {}).items()
                  if state in NEVER_SENT)
    expected = accepted - excused
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
        urls, posts = received.get("unsub_urls", []), received.get("one_click", [])
        if urls:  # every message is marketing (the tenant's default class): one-click headers on each copy
            one_click_pct = round(100 * sum(bool(u) and p for u, p in zip(urls, posts)) / len(urls), 2)
            if one_click_pct < 100:
                problems.append(f"only {one_click_pct}% of the messages carry List-Unsubscribe (http) and "
                                f"List-Unsubscribe-Post: List-Unsubscribe=One-Click")
            shared = sum(n - 1 for n in Counter(u for u in urls if u).values() if n > 1)
            if shared > duplicates:
                problems.append(f"{shared} copies carry a List-Unsubscribe link another copy had (one per recipient)")
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
    excused_note = f" ({excused} of the unsubscribed addresses' copies not sent)" if unsub else ""
    if not complete:
        problems.append(f"--time-limit {args.time_limit:g}s ran out with {delivered_count} of {expected} "
                        f"accepted messages at the sink{excused_note}")
    elif delivered_count != expected and not injection.timed_out:
        problems.append(f"the sink received {delivered_count} distinct messages, {expected} were expected: "
                        f"{accepted} accepted{excused_note}")
    undelivered = sum(n for state, n in states.items() if state != "delivered") - excused
    if undelivered or (states.get("delivered", 0) != expected and not injection.timed_out):
        problems.append(f"recipient states in PostgreSQL: {states} (expected {expected} delivered"
                        + (f", {excused} cancelled or suppressed for the {len(unsubscribed)} unsubscribed addresses)"
                           if unsub else ")"))
        problems += [f"  not delivered: {row}" for row in stuck]
    problems += unsub_problems
    if log_counts:
        problems.append("the daemon logged warnings/errors: " +
                        ", ".join(f"{level} {event} x{n}" for (level, event), n in log_counts.most_common()))
        problems += [f"  {line}" for line in log_examples]
    busy = {"whole": cores((0.0,) * len(cpu), tuple(cpu), window), **phases}
    return {
        "messages": args.messages, "clients": args.clients, "domains": args.domains, "size": args.size,
        "dkim": "rsa+ed25519" if args.dual else "rsa", "sink": args.sink, "pool_size": args.pool_size,
        "accepted": accepted, "delivered": delivered_count, "duplicates": duplicates,
        "suppressed_at_submission": injection.suppressed, "one_click_headers_pct": one_click_pct,
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
        "unsubscribe_k": args.unsubscribe, "unsubscribe_repeat": args.repeat if args.unsubscribe else None,
        "unsubscribe_repeat_gap": args.repeat_gap if args.unsubscribe else None,
        **unsub_fields,
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
UNSUBSCRIBE_COLUMNS = [("unsubscribed", "unsubscribed"), ("unsub_cancelled", "copies cancelled"),
                       ("after_unsubscribe", "deliveries after unsubscribe"), ("unsub_p50_ms", "unsub p50 ms"),
                       ("unsub_p95_ms", "unsub p95 ms"), ("unsub_p99_ms", "unsub p99 ms"),
                       ("unsub_max_ms", "unsub max ms")]


def markdown_table(results: list[dict]) -> str:
    columns = COLUMNS + (UNSUBSCRIBE_COLUMNS if any("unsubscribed" in result for result in results) else [])
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join("n/a" if result.get(key) is None else str(result[key]) for key, _ in columns)
              + " |" for result in results]
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
    if result["one_click_headers_pct"] is not None:
        print(f"one-click unsubscribe headers (List-Unsubscribe http link + List-Unsubscribe-Post) on "
              f"{result['one_click_headers_pct']}% of the messages")
    if "unsubscribed" in result:
        u = result["unsubscribe"]
        copies = u["copies"]
        print(f"unsubscribes: {u['answered_200']} of {u['addresses']} addresses ({args.repeat} messages each, "
              f"{args.repeat_gap} messages apart) "
              f"answered 200 ({u['failed']} failed); their {sum(copies.values())} copies: "
              f"{copies.get('delivered', 0)} delivered, {copies.get('cancelled', 0)} cancelled, "
              f"{copies.get('suppressed', 0)} suppressed; not sent by: {u['not_sent_by']}; "
              f"{u['addresses_with_copies_cancelled']} addresses had queued copies cancelled")
        print(f"deliveries after unsubscribe: {result['after_unsubscribe']}"
              f" ({u['arrived_during_post']} arrived while their POST was in flight and"
              f" {u['in_flight_at_unsubscribe']} whose MAIL FROM went out before the 200 arrived later: not counted)")
        lat = u["latency_ms"]
        print(f"one-click endpoint latency ms: p50 {lat['p50']} / p95 {lat['p95']} / p99 {lat['p99']} / "
              f"max {lat['max']}; first copy at the sink -> POST sent: p50 {u['reaction_ms']['p50']} ms, "
              f"max {u['reaction_ms']['max']} ms")
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

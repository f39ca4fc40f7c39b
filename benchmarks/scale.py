"""Scale runs (issue 6 item 2, issue 7 item 4): queue depth, many destination domains, daemon memory at depth.

    .venv/bin/python benchmarks/scale.py                        # defaults: depths 10,000 and 1,000,000; 10,000 domains
    .venv/bin/python benchmarks/scale.py --depths 10000,200000 --domains 2000 --parts a,b

(a) Queue-depth independence. For each depth (the first one is the reference) a fresh database in one private
    durable PostgreSQL gets that many queued recipients by COPY before the daemon starts (so nothing is
    delivered while loading), then VACUUM ANALYZE, as autovacuum would have done by then. Then `python -m mtad
    run` starts with a static route of every domain to one aiosmtpd sink process (benchmarks/deliver.py's sink)
    and RSA DKIM signing. The drain rate is taken from the sink's arrival stamps: `--window` deliveries after
    the first `--warmup` ones, so it compares the same part of the run at every depth. The run stops at the end
    of the window; a million recipients are not drained to the end (that would only measure the same thing
    longer).
(b) Many domains. `--domains` distinct domains (d00000.scale.example, ...) each with its own MX host, spread over
    `--sinks` sinks on 127.0.0.2, 127.0.0.3, ... via the loopback DNS server (mtad/simulate), `--per-domain`
    recipients each, drained completely: the rate, and whether every domain got exactly its mail.
(c) Memory. During (a) the daemon's RSS (VmRSS) is sampled every 0.25 s. Reported per depth: at ready, the
    median over the window, the peak; and the difference between the depths. Flat = within `--flat-mb`
    (default 10 MB): the scheduler holds at most `[delivery] max_active_recipients`, the rest waits in
    PostgreSQL, so the daemon's memory should not depend on the depth.

Writes benchmarks/results/scale-<UTC time>.json and .md (`--out`). Exit 1 when a delivery is duplicated or
missing, a window is not reached within `--time-limit`, or the daemon logged a warning or error; the rate and
memory verdicts are reported, not enforced (the machine may be shared). Everything it starts (PostgreSQL, the
sinks, the DNS server, the daemon) is stopped and its temp dirs removed at the end, also on errors, Ctrl-C
and SIGTERM. All traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deliver
import submit

from mtad.db.embedded import EmbeddedPostgres
from mtad.simulate.remote_world import RemoteWorld

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RSS_INTERVAL_S = 0.25
SHAPING = deliver.SHAPING  # one site of up to 20 connections, 1000 deliveries per connection, no rate limit
RECIPIENT_COLUMNS = ("message_id", "tenant_id", "address", "domain", "state", "queued_at", "next_attempt_at",
                     "updated_at")


# -- arguments --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mtad scale runs: drain rate and daemon RSS against queue depth "
                                                 "(a, c) and many destination domains (b)")
    parser.add_argument("--parts", default="a,b", help="which runs: a (depth, with memory c), b (domains); default a,b")
    parser.add_argument("--depths", default="10000,1000000",
                        help="queued recipients per run of (a), the first is the reference (default 10000,1000000)")
    parser.add_argument("--warmup", type=int, default=1000, help="deliveries not counted at the start (default 1000)")
    parser.add_argument("--window", type=int, default=8000,
                        help="deliveries measured after the warm-up (default 8000; warmup + window <= each depth)")
    parser.add_argument("--recipients-per-message", type=int, default=10,
                        help="recipients per stored message (default 10)")
    parser.add_argument("--size", type=int, default=2048, help="bytes per stored message (default 2048)")
    parser.add_argument("--max-active", type=int,
                        help="the daemon's [delivery] max_active_recipients (default: the daemon's, 10000)")
    parser.add_argument("--domains", type=int, default=10_000, help="(b) distinct destination domains (default 10000)")
    parser.add_argument("--per-domain", type=int, default=2, help="(b) recipients per domain (default 2)")
    parser.add_argument("--sinks", type=int, default=4, help="(b) sinks on 127.0.0.2, ... (default 4)")
    parser.add_argument("--flat-mb", type=float, default=10.0,
                        help="(c) RSS difference between depths still called flat (default 10 MB)")
    parser.add_argument("--time-limit", type=float, default=600, metavar="S",
                        help="cap per run on the delivery part (default 600 s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and Markdown reports")
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.depths = [int(d) for d in args.depths.split(",")]
    if not args.parts <= {"a", "b"} or not args.parts:
        parser.error("--parts takes a, b or a,b")
    if min(args.depths) < args.warmup + args.window or args.warmup < 1 or args.window < 100:
        parser.error("need --warmup >= 1, --window >= 100 and every depth >= warmup + window")
    if args.recipients_per_message < 1 or args.size < 1024 or args.time_limit <= 0:
        parser.error("need --recipients-per-message >= 1, --size >= 1024, --time-limit > 0")
    if not 1 <= args.sinks <= 50 or args.domains < 1 or args.per_domain < 1:
        parser.error("need 1 <= --sinks <= 50, --domains >= 1, --per-domain >= 1")
    return args


# -- loading the queue ------------------------------------------------------------------------------

def stored_message(size: int) -> bytes:
    head = (f"From: Spring News <{submit.SENDER}>\r\nTo: readers@scale.example\r\nSubject: Spring collection\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <scale@{submit.DOMAIN}>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n').encode()
    return head + submit.html_body(size - len(head))


async def preload_queue(conn: asyncpg.Connection, *, tenant_id: int, mail_from: str, recipients: int,
                        per_message: int, domains: Sequence[str], body: bytes, tag: str = "S") -> int:
    """COPY `recipients` queued recipients (and their messages, `per_message` recipients each) into the queue.

    Recipient i is `reader<i>@domains[i % len(domains)]`; recipient i is due 1 µs before recipient i+1, so the
    claim takes them in order. `tag` keeps the queue ids of several loads into one database apart. Returns the
    number of messages stored. Nothing is delivered meanwhile only if no daemon is delivering from this database."""
    now = datetime.now(UTC)
    messages = -(-recipients // per_message)
    await conn.copy_records_to_table(
        "messages", columns=("queue_id", "tenant_id", "mail_from", "size_bytes", "received_at", "body"),
        records=((f"{tag}{n:09d}", tenant_id, mail_from, len(body), now, body) for n in range(messages)))
    ids = dict(await conn.fetch("SELECT queue_id, id FROM messages WHERE queue_id LIKE $1", f"{tag}%"))
    oldest = now - timedelta(microseconds=recipients)

    def rows():
        for i in range(recipients):
            domain = domains[i % len(domains)]
            yield (ids[f"{tag}{i // per_message:09d}"], tenant_id, f"reader{i}@{domain}", domain, "queued",
                   now, oldest + timedelta(microseconds=i), now)

    await conn.copy_records_to_table("recipients", columns=RECIPIENT_COLUMNS, records=rows())
    return messages


async def load_database(admin_url: str, name: str, recipients: int, per_message: int, domains: Sequence[str],
                        size: int) -> tuple[str, dict]:
    """A fresh database `name`: schema, tenant `bench`, the preloaded queue, VACUUM ANALYZE. (url, timings)."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(admin_url, name)
    await submit.prepare_database(url)
    conn = await asyncpg.connect(url)
    try:
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", submit.TENANT)
        started = time.monotonic()
        messages = await preload_queue(conn, tenant_id=tenant_id, mail_from=submit.SENDER, recipients=recipients,
                                       per_message=per_message, domains=domains, body=stored_message(size))
        copied = time.monotonic()
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE recipients")
        return url, {"messages": messages, "copy_s": round(copied - started, 1),
                     "vacuum_analyze_s": round(time.monotonic() - copied, 1)}
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def database_url(admin_url: str, name: str) -> str:
    head, _, tail = admin_url.partition("?")
    return head.rsplit("/", 1)[0] + "/" + name + ("?" + tail if tail else "")


async def recipient_states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetch("SELECT state, count(*) FROM recipients GROUP BY state"))
    finally:
        await conn.close()


# -- the daemon -------------------------------------------------------------------------------------

def write_daemon_config(workdir: Path, db_url: str, delivery: str, max_active: int | None) -> Path:
    """submit.py's config (JSON logs, submission and HTTP on 127.0.0.1:0) with our [delivery] and [dkim]."""
    config = workdir / "mtad.toml"
    submit.write_config(config, db_url, workdir / "state")
    text = config.read_text()
    # submit.py turns delivery off in its own [delivery] section; TOML forbids a second one, so drop it.
    start = text.index("[delivery]")
    end = text.find("\n[", start + 1)
    text = text[:start] + (text[end + 1:] if end >= 0 else "")
    (workdir / "shaping.toml").write_text(SHAPING)
    q = json.dumps  # a JSON string is a valid TOML basic string
    text += f"""
[dkim]
key_dir = {q(str(workdir / "dkim"))}

[delivery]
enabled = true
shaping_file = {q(str(workdir / "shaping.toml"))}
{delivery}
"""
    if max_active:
        text += f"max_active_recipients = {max_active}\n"
    config.write_text(text)
    deliver.write_keys(workdir / "dkim", dual=False)
    return config


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples (seconds since start, daemon VmRSS in KB, deliveries so far) every RSS_INTERVAL_S in a thread,
    and the most file descriptors the daemon had open (sockets: one per pooled outbound connection)."""

    def __init__(self, pid: int, delivered) -> None:
        self.pid, self.delivered = pid, delivered
        self.samples: list[tuple[float, int, int]] = []
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._started = time.monotonic()

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self._started, rss_kb(self.pid), self.delivered()))
                self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return  # the daemon exited
            self._stop.wait(RSS_INTERVAL_S)

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def memory_summary(samples: list[tuple[float, int, int]], pid: int, first: int, last: int) -> dict:
    """RSS at ready, median and peak over the window of deliveries [first, last), peak over the run, in MB."""
    in_window = [kb for _, kb, done in samples if first <= done < last] or [kb for _, kb, _ in samples[-1:]]
    return {"rss_ready_mb": round(samples[0][1] / 1024, 1) if samples else None,
            "rss_window_median_mb": round(statistics.median(in_window) / 1024, 1) if in_window else None,
            "rss_window_peak_mb": round(max(in_window) / 1024, 1) if in_window else None,
            "rss_run_peak_mb": round(max(kb for _, kb, _ in samples) / 1024, 1) if samples else None,
            "samples": len(samples)}


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        submit.stop_daemon(proc)


# -- (a) and (c): drain rate and memory against depth --------------------------------------------------

def drain_at_depth(admin_url: str, root: Path, depth: int, args: argparse.Namespace) -> dict:
    workdir = root / f"depth-{depth}"
    workdir.mkdir()
    os.chmod(workdir, 0o755)
    name = f"scale_depth_{depth}"
    domains = [f"rcpt{k:03d}.example" for k in range(1, 51)]
    print(f"(a) depth {depth:,}: loading...", file=sys.stderr, flush=True)
    url, load = submit.run_async(load_database(admin_url, name, depth, args.recipients_per_message, domains, args.size))
    print(f"(a) depth {depth:,}: loaded in {load['copy_s']} s (+ {load['vacuum_analyze_s']} s VACUUM ANALYZE); "
          "delivering...", file=sys.stderr, flush=True)
    sink = daemon = sampler = None
    log_path = workdir / "mtad.log"
    target = args.warmup + args.window
    try:
        sink = deliver.AiosmtpdSink(workdir, args.time_limit + 120)
        route = f"routes = {{ \"*\" = {json.dumps(f'127.0.0.1:{sink.port}')} }}"
        config = write_daemon_config(workdir, url, route, args.max_active)
        started = time.monotonic()
        daemon, _ = submit.start_daemon(config, log_path)
        sampler = RssSampler(daemon.pid, lambda: sink.received()[0]).start()
        reached = False
        while time.monotonic() - started < args.time_limit and daemon.poll() is None:
            if sink.received()[0] >= target:
                reached = True
                break
            time.sleep(0.1)
        held = submit.run_async(recipient_states(url)).get("active", 0)  # leased by the daemon at window end
        samples = sampler.stop()
        hwm = submit.peak_rss_mb(daemon.pid) if daemon.poll() is None else None
        died = daemon.poll()
        stop_process(daemon)
        daemon = None
        received = sink.stop()
        sink = None
    finally:
        if sampler is not None:
            sampler.stop()
        stop_process(daemon)
        if sink is not None:
            sink.stop()
        submit.run_async(drop_database(admin_url, name))
    arrivals = sorted(received.get("arrivals", []))
    rcpts = received.get("rcpts", [])
    duplicates = len(rcpts) - len(set(rcpts))
    problems = []
    if died is not None:
        problems.append(f"depth {depth}: the daemon exited with {died}")
    if not reached:
        problems.append(f"depth {depth}: only {len(arrivals)} of {target} deliveries within {args.time_limit} s")
    if duplicates:
        problems.append(f"depth {depth}: {duplicates} recipients delivered twice")
    counts, examples = deliver.daemon_log_problems(log_path)
    if counts:
        problems.append(f"depth {depth}: daemon log warnings/errors {dict(counts)}: {examples[:2]}")
    rate = None
    if len(arrivals) >= target:
        span = arrivals[target - 1] - arrivals[args.warmup - 1]
        rate = round(args.window / span, 1) if span > 0 else None
    return {"depth": depth, **load, "delivered": len(arrivals), "transactions": received.get("transactions"),
            "window_rate_per_s": rate, "held_at_window_end": held, "vm_hwm_mb": hwm, "peak_open_fds": sampler.peak_fds,
            **memory_summary(samples, 0, args.warmup, target),
            "rss_timeline": [(round(t, 2), kb, done) for t, kb, done in samples[::4]], "problems": problems}


# -- (b): many destination domains ------------------------------------------------------------------

async def deferral_replies(url: str) -> dict[str, int]:
    """Deferred attempts by reply text (a recipient may have been deferred and then delivered)."""
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetch("SELECT coalesce(reply, ''), count(*) FROM events WHERE kind = 'deferred' "
                                     "GROUP BY 1 ORDER BY 2 DESC LIMIT 10"))
    finally:
        await conn.close()


async def wait_for_all(world: RemoteWorld, daemon: subprocess.Popen, expected: int, time_limit: float) -> int:
    deadline = time.monotonic() + time_limit
    while time.monotonic() < deadline and daemon.poll() is None:
        arrived = sum(len(m.rcpt_tos) for sink in world.sinks.values() for m in sink.messages)
        if arrived >= expected:
            return arrived
        await asyncio.sleep(0.25)
    return sum(len(m.rcpt_tos) for sink in world.sinks.values() for m in sink.messages)


async def many_domains(admin_url: str, root: Path, args: argparse.Namespace) -> dict:
    workdir = root / "domains"
    workdir.mkdir()
    os.chmod(workdir, 0o755)
    name = "scale_domains"
    domains = [f"d{n:05d}.scale.example" for n in range(args.domains)]
    expected = args.domains * args.per_domain
    world = RemoteWorld([f"mx{k}" for k in range(args.sinks)])
    await world.start()
    daemon = sampler = None
    log_path = workdir / "mtad.log"
    try:
        for n, domain in enumerate(domains):
            world.add_domain(domain, sink=f"mx{n % args.sinks}", mx_host=f"mx.{domain}")
        print(f"(b) {args.domains:,} domains x {args.per_domain}: loading...", file=sys.stderr, flush=True)
        url, load = await load_database(admin_url, name, expected, args.recipients_per_message, domains, args.size)
        delivery = (f'nameservers = ["127.0.0.1"]\ndns_port = {world.dns.port}\nsmtp_port = {world.smtp_port}\n'
                    'dns_timeout = "5s"\nconnect_timeout = "10s"\ncommand_timeout = "30s"\ndata_timeout = "30s"\n'
                    # a deferral is reported below; retried after 5 s it does not hold the run up for 5 minutes
                    'minimal_backoff_time = "5s"')
        config = write_daemon_config(workdir, url, delivery, args.max_active)
        print(f"(b) delivering {expected:,} recipients...", file=sys.stderr, flush=True)
        started = time.monotonic()
        daemon, _ = await asyncio.to_thread(submit.start_daemon, config, log_path)
        sampler = RssSampler(daemon.pid, lambda: 0).start()
        arrived = await wait_for_all(world, daemon, expected, args.time_limit)
        elapsed = time.monotonic() - started
        states = await recipient_states(url)
        deferrals = await deferral_replies(url)
        samples = sampler.stop()
        died = daemon.poll()
        await asyncio.to_thread(stop_process, daemon)
        daemon = None
    finally:
        if sampler is not None:
            sampler.stop()
        if daemon is not None:
            await asyncio.to_thread(stop_process, daemon)
        messages = [m for sink in world.sinks.values() for m in sink.messages]
        per_sink = {sink.host: len(sink.messages) for sink in world.sinks.values()}
        connections = sum(sink.connections_total for sink in world.sinks.values())
        await world.stop()
        await drop_database(admin_url, name)
    delivered = Counter(r.lower() for m in messages for r in m.rcpt_tos)
    per_domain = Counter(address.rsplit("@", 1)[1] for address in delivered)
    short = [d for d in domains if per_domain[d] < args.per_domain]
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    stamps = sorted(m.received_at for m in messages)
    bulk = stamps[:max(2, len(stamps) * 99 // 100)]  # without the last 1 %: a retried deferral is not the rate
    problems = []
    if died is not None:
        problems.append(f"domains: the daemon exited with {died}")
    if short:
        problems.append(f"domains: {len(short)} domains did not get all their mail (e.g. {short[:3]}), "
                        f"{arrived} of {expected} recipients arrived within {args.time_limit} s; states {states}")
    if duplicates:
        problems.append(f"domains: {duplicates} recipients delivered twice")
    counts, examples = deliver.daemon_log_problems(log_path)
    if counts:
        problems.append(f"domains: daemon log warnings/errors {dict(counts)}: {examples[:2]}")
    return {"domains": args.domains, "per_domain": args.per_domain, "sinks": args.sinks, **load,
            "delivered": sum(delivered.values()), "expected": expected,
            "domains_complete": args.domains - len(short), "duplicates": duplicates, "states": states,
            "elapsed_s": round(elapsed, 1),
            "rate_per_s": round((len(bulk) - 1) / max(bulk[-1] - bulk[0], 1e-9), 1) if len(bulk) > 1 else None,
            "deferrals": deferrals, "peak_open_fds": sampler.peak_fds if sampler else None,
            "messages_per_sink": per_sink, "sink_connections": connections,
            **memory_summary(samples, 0, 0, 1), "problems": problems}


# -- report -----------------------------------------------------------------------------------------

def verdicts(depth_runs: list[dict], flat_mb: float) -> dict:
    """Ratios against the first (reference) depth: drain rate, and the RSS differences (c)."""
    if len(depth_runs) < 2:
        return {}
    reference, *others = depth_runs
    out = {}
    for run in others:
        rate = (round(run["window_rate_per_s"] / reference["window_rate_per_s"], 2)
                if run["window_rate_per_s"] and reference["window_rate_per_s"] else None)
        median_diff = round(run["rss_window_median_mb"] - reference["rss_window_median_mb"], 1)
        peak_diff = round(run["rss_window_peak_mb"] - reference["rss_window_peak_mb"], 1)
        out[str(run["depth"])] = {"rate_ratio": rate, "rss_median_diff_mb": median_diff,
                                  "rss_peak_diff_mb": peak_diff,
                                  "rss_flat": abs(median_diff) <= flat_mb and abs(peak_diff) <= flat_mb}
    return out


def markdown(report: dict) -> str:
    args, info = report["args"], report["machine"]
    lines = [f"# mtad scale runs, {report['started']}", "",
             (f"machine: {info['nproc']} cores, Python {info['python']}, {info['platform']}; shared with other "
              f"work, so rates are indicative. commit {report['commit']}"), ""]
    if report["depth_runs"]:
        lines.append("## (a) drain rate and (c) daemon RSS against queue depth")
        lines.append("")
        lines.append(f"{args['recipients_per_message']} recipients per message of {args['size']} bytes, RSA DKIM, "
                     f"one sink; rate over deliveries {args['warmup']}..{args['warmup'] + args['window']} "
                     "(sink arrival stamps); RSS = VmRSS sampled every 0.25 s.")
        lines.append("")
        lines.append("| queued | COPY s | deliveries/s | held (active) at window end | RSS ready MB "
                     "| RSS window median MB | RSS window peak MB | VmHWM MB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in report["depth_runs"]:
            hwm = round(r["vm_hwm_mb"], 1) if r["vm_hwm_mb"] else None
            lines.append(f"| {r['depth']:,} | {r['copy_s']} | {r['window_rate_per_s']} | {r['held_at_window_end']:,} "
                         f"| {r['rss_ready_mb']} | {r['rss_window_median_mb']} | {r['rss_window_peak_mb']} | {hwm} |")
        for depth, v in report["verdicts"].items():
            lines.append("")
            lines.append(f"depth {int(depth):,} against {report['depth_runs'][0]['depth']:,}: rate ratio "
                         f"{v['rate_ratio']}, RSS median {v['rss_median_diff_mb']:+} MB, peak "
                         f"{v['rss_peak_diff_mb']:+} MB -> {'flat' if v['rss_flat'] else 'NOT flat'} "
                         f"(limit {args['flat_mb']} MB)")
    if report["domains_run"]:
        d = report["domains_run"]
        lines += ["", "## (b) many destination domains", ""]
        lines.append("| domains | recipients | delivered | domains complete | duplicates | elapsed s "
                     "| deliveries/s (first 99 %) | sink connections | daemon peak open fds | RSS peak MB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lines.append(f"| {d['domains']:,} | {d['expected']:,} | {d['delivered']:,} | {d['domains_complete']:,} "
                     f"| {d['duplicates']} | {d['elapsed_s']} | {d['rate_per_s']} | {d['sink_connections']:,} "
                     f"| {d['peak_open_fds']} | {d['rss_run_peak_mb']} |")
        lines += ["", (f"per sink: {d['messages_per_sink']}; states: {d['states']}; deferred attempts by reply: "
                       f"{d['deferrals'] or 'none'}")]
    lines += ["", "problems: " + ("; ".join(report["problems"]) if report["problems"] else "none")]
    return "\n".join(lines) + "\n"


def commit_of_tree() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mtad-bench-scale-"))
    os.chmod(root, 0o755)  # as root the server runs as `postgres`, which must traverse to its directory
    cluster = EmbeddedPostgres(root / "pg", durable=True)
    report = {"started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": submit.machine(),
              "commit": commit_of_tree(), "args": {k: (sorted(v) if isinstance(v, set) else str(v) if
                                                       isinstance(v, Path) else v) for k, v in vars(args).items()},
              "depth_runs": [], "domains_run": None, "verdicts": {}, "problems": []}
    try:
        cluster.start(timeout_s=60)
        if "a" in args.parts:
            for depth in args.depths:
                run_result = drain_at_depth(cluster.url(), root, depth, args)
                report["depth_runs"].append(run_result)
                report["problems"] += run_result["problems"]
                print(f"(a) depth {depth:,}: {run_result['window_rate_per_s']} deliveries/s, RSS window median "
                      f"{run_result['rss_window_median_mb']} MB", file=sys.stderr, flush=True)
            report["verdicts"] = verdicts(report["depth_runs"], args.flat_mb)
        if "b" in args.parts:
            report["domains_run"] = submit.run_async(many_domains(cluster.url(), root, args))
            report["problems"] += report["domains_run"]["problems"]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scale-{report['started'].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 1 if report["problems"] else 0


def _sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does, so the finally blocks stop everything (see deliver.py)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; daemon, sinks and cluster stopped, temp dirs removed", file=sys.stderr)
        sys.exit(130)

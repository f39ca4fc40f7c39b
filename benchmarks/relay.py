"""Paired relay benchmark: mtad against Postfix on the same machine, same workload, same sink (issue 6, item 1).

Run:
    make bench                                            # 20,000 messages, 20 clients, 3 pairs
    .venv/bin/python benchmarks/relay.py --messages 5000 --pairs 2
    .venv/bin/python benchmarks/relay.py --messages 5000 --dual --out /tmp/relay   # RSA + Ed25519 in mtad
    .venv/bin/python benchmarks/relay.py --mtad-only --pairs 1 --pg-stats   # + mtad's SQL per message

Each pair runs A (mtad) then B (Postfix), each from nothing:

* remote side: the lean sink of benchmarks/lean_smtp.py in its own process, which records for every message its
  arrival time and the `X-Bench-Sent` stamp the injector put in, so submit -> delivered latency is read at the
  sink. It is an asyncio.Protocol state machine (ESMTP with PIPELINING, as Postfix's smtp-sink offers), not
  aiosmtpd: aiosmtpd cost ~0.75 ms of CPU per message, 0.3 of a core at 400 msg/s taken from the MTAs.
  (Postfix's smtp-sink is cheaper still but cannot show headers, so it could not give latency.)
* mtad: a private durable PostgreSQL (fsync and synchronous_commit on), the schema, tenant `bench`, an RSA-2048
  DKIM key (`--dual`: an Ed25519 key too), `python -m mtad run` with a static route of every domain to the sink,
  a shaping file allowing 20 connections (10 at the start, 1000 deliveries per connection), and
  `[submission] trusted_networks = [{ network = "127.0.0.1/32", tenant = "bench" }]` so the injector
  submits without STARTTLS or AUTH, as it does to Postfix.
* Postfix: a private instance (`postfix -c DIR start`): its own main.cf/master.cf, queue and data directories in
  a temp dir, smtpd on a free 127.0.0.1 port only, `relayhost = [127.0.0.1]:SINK`, `mynetworks = 127.0.0.0/8`,
  default queue settings plus `default_destination_concurrency_limit` = mtad's connection limit (20), no
  chroot. Postfix relays WITHOUT DKIM signing (it has none built in); mtad signs every message.

The injector (this process, uvloop when installed; benchmarks/lean_smtp.py's asyncio.Protocol client, not
aiosmtplib, for the same reason as the sink) opens `--clients` plain SMTP sessions past EHLO before the clock
starts, then sends `--messages` ~5 KB messages, one recipient each, over 50 recipient domains with a Zipf skew
(the same list for both MTAs): MAIL, RCPT and DATA each wait for their reply (mtad does not offer PIPELINING,
so neither MTA gets it). The run ends when the sink has every accepted message or at `--time-limit`.

Per run: accepted/s, delivered/s end to end (N / (last arrival - first injection)), latency p50/p95/p99
(arrival - X-Bench-Sent), CPU seconds per 1,000 messages of the MTA (mtad: daemon + postmaster and its
children; Postfix: master and its children, reaped ones included through cutime/cstime), peak RSS of the MTA's
process tree (sum of PSS over the roots and their children, sampled every second: shared pages are split
among the processes sharing them, not counted once per process). Then the ratio mtad/Postfix pair by pair and
the median. The injector's and the sink's own CPU (per 1,000 messages, and as cores busy) are reported too, to
show how much of the machine the harness took. Results: `--out` (default benchmarks/results/)
relay-<timestamp>.json, .md and .png.

Everything started (sink, daemon, PostgreSQL, Postfix) is stopped and temp dirs removed at the end, also on
errors, Ctrl-C and SIGTERM. Traffic stays on 127.0.0.1; every run is bounded by --messages and --time-limit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deliver  # noqa: E402  (keys, config, workload, process helpers)
import lean_smtp  # noqa: E402  (the sink and the injector)
import submit  # noqa: E402
from lean_smtp import Injection  # noqa: E402

from mtad.db.embedded import EmbeddedPostgres  # noqa: E402

CONNECTION_LIMIT = 20  # mtad's [default] connection_limit in deliver.SHAPING; Postfix gets the same
POSTFIX_START_TIMEOUT_S = 30
DOMAINS = 50
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="paired relay benchmark: mtad vs Postfix (A B A B ...)")
    parser.add_argument("--messages", type=int, default=20000, help="messages per run (default 20000)")
    parser.add_argument("--clients", type=int, default=20, help="parallel injecting SMTP sessions (default 20)")
    parser.add_argument("--pairs", type=int, default=3, help="mtad/Postfix pairs, alternated (default 3)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    parser.add_argument("--pipelining", action="store_true",
                        help="the injector pipelines MAIL/RCPT/DATA (RFC 2920) into both MTAs, as Postfix's smtp client does")
    parser.add_argument("--dual", action="store_true", help="mtad signs with RSA-2048 and Ed25519 (two signatures)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="mtad processes sharing the listeners and the database (mtad run --workers; default: "
                             "one per core, as mtad is meant to run on a multi-core host)")
    parser.add_argument("--time-limit", type=float, default=600, metavar="S",
                        help="cap in seconds on injection plus delivery, per run (default 600)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON, Markdown and PNG")
    parser.add_argument("--seed", type=int, default=1, help="seed of the recipient-domain draw (default 1)")
    parser.add_argument("--mtad-only", action="store_true", help="skip Postfix (also automatic without it)")
    parser.add_argument("--pg-stats", action="store_true",
                        help="load pg_stat_statements into mtad's PostgreSQL and report its statements per message")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.pairs < 1 or args.size < 1024 or args.time_limit <= 0:
        parser.error("need --messages >= 1, --pairs >= 1, --size >= 1024, --time-limit > 0")
    if not 1 <= args.clients <= 200:
        parser.error("--clients must be between 1 and 200")
    return args


def sbin(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")


def postfix_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (postfix -c DIR start); not root"
    missing = [name for name in ("postfix", "postconf") if not sbin(name)]
    if missing:
        return f"Postfix binaries not found: {', '.join(missing)} (make setup installs postfix)"
    return None


# -- progress -----------------------------------------------------------------------------------------

class Progress:
    """rich progress bars when rich is installed and stderr is a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self._rich = None
        if sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                    TimeElapsedColumn
                self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), transient=False)
            except ImportError:
                pass
        self._tasks: dict = {}
        self._last_print = 0.0

    def __enter__(self) -> "Progress":
        if self._rich:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich:
            self._rich.__exit__(*exc)

    def log(self, text: str) -> None:
        if self._rich:
            self._rich.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def run(self, label: str, total: int) -> None:
        if self._rich:
            self._tasks = {"in": self._rich.add_task(f"{label} accepted", total=total),
                           "out": self._rich.add_task(f"{label} at sink", total=total)}

    def update(self, label: str, accepted: int, arrived: int, total: int, final: bool = False) -> None:
        if self._rich:
            self._rich.update(self._tasks["in"], completed=accepted)
            self._rich.update(self._tasks["out"], completed=arrived)
        elif final or time.monotonic() - self._last_print >= 2:
            self._last_print = time.monotonic()
            print(f"  {label}: accepted {accepted}/{total}, at sink {arrived}/{total}", file=sys.stderr, flush=True)


# -- process trees ------------------------------------------------------------------------------------

def tree_cpu_seconds(root: int) -> float:
    """`root` with its reaped children (cutime/cstime) plus its live children: postgres or Postfix's master."""
    return submit.postgres_cpu_seconds(root)


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (libraries, PostgreSQL's shared buffers) split among their users, so
    summing over a process tree does not count them once per process as VmRSS would."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children_by_parent() -> dict[int, list[int]]:
    """Every process's direct children, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    parent = int(stat.read().rsplit(b")", 1)[1].split(None, 2)[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    return children


class RssSampler:
    """Peak of the summed PSS of some root processes and their direct children, sampled every second.

    It runs in the benchmark's process, so its CPU counts as the injector's: reading smaps_rollup makes the
    kernel walk each process's page tables (~1 ms per process here); four samples a second were a third of
    the harness's CPU, so one, plus one at the start and one at the stop (a short run may last less than a
    second). `cpu_seconds` is its own share (the thread's CPU time), reported apart so the injector's cost
    can be told from it."""

    def __init__(self, roots: list[int]) -> None:
        self.roots, self.peak_kb, self.cpu_seconds = roots, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            children = children_by_parent()  # one /proc pass for all roots, not one per root
            pids = set(self.roots)
            for root in self.roots:
                pids.update(children.get(root, ()))
            self.peak_kb = max(self.peak_kb, sum(pss_kb(pid) for pid in pids))
            self.cpu_seconds = time.thread_time()
            if stopping:
                break
            self._stop.wait(1.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return round(self.peak_kb / 1024, 1)


# -- the private Postfix ------------------------------------------------------------------------------

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_main_cf(root: Path, sink_port: int) -> str:
    return f"""\
# Private benchmark instance: a plain relay to the sink, default queue settings plus the concurrency mtad gets.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
default_destination_concurrency_limit = {CONNECTION_LIMIT}
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
"""


class PrivatePostfix:
    """`postfix -c DIR start` with everything under one temp dir; `stop()` stops it and waits for master."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.root = workdir / "postfix"
        self.conf = self.root / "etc"
        self.port = deliver._free_port()
        self.master_pid: int | None = None
        self.conf.mkdir(parents=True)
        for sub in ("queue", "data"):
            (self.root / sub).mkdir()
        shutil.chown(self.root / "data", "postfix")
        (self.conf / "main.cf").write_text(postfix_main_cf(self.root, sink_port))
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self.config_text = (self.conf / "main.cf").read_text()
        self._postfix("check")
        self._postfix("start")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + POSTFIX_START_TIMEOUT_S
        while not (pid_file.exists() and deliver._port_open(self.port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.master_pid = int(pid_file.read_text().split()[0])
        self.check_loopback_only()

    def _postfix(self, command: str, timeout_s: float = 60) -> None:
        done = subprocess.run([sbin("postfix"), "-c", str(self.conf), command], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"postfix {command} failed ({done.returncode}): {done.stderr[-1500:]}")

    def log_tail(self) -> str:
        try:
            return (self.root / "postfix.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def check_loopback_only(self) -> None:
        """Every TCP socket the master listens on is on 127.0.0.1 (read from /proc/net/tcp)."""
        inodes = set()
        for fd in Path(f"/proc/{self.master_pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if cols[9] in inodes and cols[3] == "0A":  # LISTEN
                    if table.endswith("6") or cols[1].split(":")[0] != "0100007F":
                        raise RuntimeError(f"Postfix listens beyond 127.0.0.1: {cols[1]} in {table}")

    def log_warnings(self) -> tuple[list[str], list[str]]:
        """(problems, notes): lines of the instance's log with warning/error/fatal/panic (a fair run has none),
        except the file system clock warning, which is a note: on some VMs file time stamps run up to a second
        ahead of time(), and Postfix's cleanup then sets each queue file's time stamps itself (one utime() per
        message; the warning says it "hurts performance"). That is the machine, not the configuration. Also notes:
        qmgr's "mail for [127.0.0.1]:PORT is using up N of N active queue entries" and the advice lines it logs
        with it (qmgr_clog_warn_time: "you may need to reduce/increase ...", "please avoid flushing the whole
        queue ...", "lots of deferred mail ...", "to turn off these warnings ..."): every message goes to the one
        relay host here, so that destination fills Postfix's in-memory active queue by design of the benchmark;
        Postfix keeps delivering."""
        try:
            lines = (self.root / "postfix.log").read_text(errors="replace").splitlines()
        except OSError:
            return [], []
        bad = [line for line in lines
               if any(f" {level}: " in line for level in ("warning", "error", "fatal", "panic"))]
        notes = [line for line in bad if any(known in line for known in (
            "file system clock is", "resetting file time stamps", "active queue entries", "you may need to reduce",
            "you may need to increase", "so that Postfix quickly skips", "please avoid flushing the whole queue",
            "lots of deferred mail", "to turn off these warnings"))]
        return [line for line in bad if line not in notes][:20], notes[:4]

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred"):
            directory = self.root / "queue" / sub
            if directory.exists() and any(p.is_file() for p in directory.rglob("*")):
                return False
        return True

    def stop(self) -> None:
        if self.master_pid is None:
            return
        try:
            self._postfix("stop", timeout_s=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            try:
                self._postfix("abort", timeout_s=15)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 15
        while Path(f"/proc/{self.master_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{self.master_pid}").exists():  # still there: kill it and its children
            for pid in deliver.children_of(self.master_pid) + [self.master_pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master_pid = None


# -- the workload -------------------------------------------------------------------------------------

def recipients_for(args: argparse.Namespace) -> list[str]:
    domains = deliver.recipient_domains(args.messages, DOMAINS, args.seed)
    return [f"reader{i}@{domains[i]}" for i in range(args.messages)]


async def inject(port: int, args: argparse.Namespace, recipients: list[str], result: Injection,
                 on_connected) -> None:
    """Plain SMTP (no STARTTLS, no AUTH), the same for both MTAs; sessions connect before the clock starts.
    Each message is built when its session takes it, with the X-Bench-Sent stamp of that moment."""
    body = deliver.sized_body(args.size)
    messages = [(deliver.SENDER, recipient, functools.partial(deliver.make_message, index, recipient, body))
                for index, recipient in enumerate(recipients[:args.messages])]
    await lean_smtp.inject(port, messages, args.clients, result, on_connected, time_limit=args.time_limit,
                           helo="bench.client", reply_timeout_s=submit.SMTP_TIMEOUT_S,
                           setup_timeout_s=submit.SETUP_TIMEOUT_S, pipelining=args.pipelining)


async def drive(port: int, args: argparse.Namespace, recipients: list[str], sink, label: str,
                progress: Progress, on_connected) -> tuple[Injection, bool]:
    """Inject, and watch the sink until it has every accepted message (or --time-limit from the first send)."""
    result = Injection()
    started = time.monotonic()
    task = asyncio.create_task(inject(port, args, recipients, result, on_connected))
    complete = False
    try:
        while True:
            await asyncio.sleep(0.1)
            arrived = sink.received()[0]
            progress.update(label, result.accepted, arrived, args.messages)
            if task.done():
                task.result()
                if arrived >= result.accepted:
                    complete = True
                    break
            if time.monotonic() - started > args.time_limit + submit.SETUP_TIMEOUT_S:
                break
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    progress.update(label, result.accepted, sink.received()[0], args.messages, final=True)
    return result, complete


# -- one run ------------------------------------------------------------------------------------------

def mtad_config(workdir: Path, db_url: str, sink_port: int, workers: int = 1) -> Path:
    config = deliver.write_config(workdir, db_url, sink_port, None)
    text = config.read_text()
    if workers > 1:  # workers share one port (SO_REUSEPORT): it cannot be 0, which each would pick anew
        listen = 'listen = ["127.0.0.1:0"]\nimplicit_tls_listen = []\n'
        assert listen in text, "submit.write_config changed its [submission] section"
        text = text.replace(listen, f'listen = ["127.0.0.1:{deliver._free_port()}"]\nimplicit_tls_listen = []\n', 1)
        text += f"\n[cluster]\nworkers = {workers}\n"
    anchor = "implicit_tls_listen = []\n"
    assert anchor in text, "submit.write_config changed its [submission] section"
    text = text.replace(anchor, anchor + 'trusted_networks = [{ network = "127.0.0.1/32", tenant = "'
                        + submit.TENANT + '" }]\n', 1)
    config.write_text(text)
    return config


def run_once(mta: str, args: argparse.Namespace, recipients: list[str], progress: Progress, label: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"mtad-bench-relay-{mta}-"))
    os.chmod(workdir, 0o755)  # postgres / postfix users traverse to their directories
    sink = daemon = cluster = postfix = sampler = None
    extra: dict = {}
    try:
        sink = lean_smtp.LeanSink(workdir, args.time_limit + 300)
        if mta == "mtad":
            cluster = EmbeddedPostgres(workdir / "pg", durable=True, extra_settings=PG_STATS if args.pg_stats else None)
            cluster.start(timeout_s=60)
            url = cluster.url()
            submit.run_async(submit.prepare_database(url))
            if args.pg_stats:
                submit.run_async(reset_pg_statements(url))
            keys = deliver.write_keys(workdir / "dkim", args.dual)
            daemon, port = submit.start_daemon(mtad_config(workdir, url, sink.port, args.workers), workdir / "mtad.log")
            postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
            daemon_pid = daemon.pid
            roots = [daemon_pid, postmaster]

            def mta_cpu() -> float:  # with workers, the daemon is a supervisor and its live children do the work
                parts["daemon"], parts["postgres"] = tree_cpu_seconds(daemon_pid), tree_cpu_seconds(postmaster)
                return parts["daemon"] + parts["postgres"]
            extra["dkim_signatures_expected"] = len(keys)
        else:
            postfix = PrivatePostfix(workdir, sink.port)
            port = postfix.port
            master = postfix.master_pid
            roots = [master]

            def mta_cpu() -> float:
                return tree_cpu_seconds(master)
        sampler = RssSampler(roots)
        clock: dict = {}
        parts: dict[str, float] = {}  # mtad's CPU split: the daemon's processes and PostgreSQL's

        def context_cpu() -> tuple[float, float, float, float]:
            return (submit.client_cpu_seconds(), sink.cpu_seconds(), deliver.machine_busy_seconds(),
                    sampler.cpu_seconds)

        def on_connected() -> None:
            clock["cpu"], clock["context"], clock["start"] = mta_cpu(), context_cpu(), time.monotonic()
            clock["parts"] = dict(parts)

        progress.run(label, args.messages)
        injection, complete = submit.run_async(drive(port, args, recipients, sink, label, progress, on_connected))
        cpu = mta_cpu() - clock.get("cpu", 0.0)
        window = time.monotonic() - clock["start"] if "start" in clock else 0.0
        if window > 0:  # context: were the MTA's cores shared with more than the injector and the sink?
            injector, sink_cpu, machine, rss_sampler = (b - a for a, b in zip(clock["context"], context_cpu()))
            extra["cores_busy"] = {"mta": round(cpu / window, 2), "injector": round(injector / window, 2),
                                   "sink": round(sink_cpu / window, 2), "machine": round(machine / window, 2)}
            if injection.accepted:  # what the harness itself cost; the injector's figure includes the sampler's
                extra["harness_cpu_s_per_1k"] = {
                    "injector": round(injector * 1000 / injection.accepted, 3),
                    "sink": round(sink_cpu * 1000 / injection.accepted, 3),
                    "rss_sampler": round(rss_sampler * 1000 / injection.accepted, 3)}
                if parts:
                    extra["mta_cpu_s_per_1k"] = {name: round((parts[name] - clock["parts"][name]) * 1000
                                                             / injection.accepted, 3) for name in parts}
        if daemon is not None:
            extra["daemon_peak_rss_mb"] = round(submit.peak_rss_mb(daemon.pid), 1)
            if daemon.poll() is not None:
                raise RuntimeError(f"mtad exited with {daemon.returncode} during the run")
            if args.pg_stats:  # read before recipient_states, whose own query would show up
                extra["pg_statements"] = submit.run_async(pg_statements(url))
            extra["states"] = submit.run_async(deliver.recipient_states(url))
            log_counts, examples = deliver.daemon_log_problems(workdir / "mtad.log")
            extra["daemon_warnings"] = sum(log_counts.values())
            extra["daemon_warning_examples"] = examples  # the log goes with the run's directory
        if postfix is not None:
            extra["postfix_queue_empty"] = postfix.queue_empty()
            extra["postfix_log_warnings"], extra["postfix_log_notes"] = postfix.log_warnings()
        peak_rss = sampler.stop()
        sampler = None
        received = sink.stop()
        sink = None
        return summarize(mta, args, injection, complete, received, cpu, peak_rss, extra)
    finally:
        with deliver.signals_ignored():  # a second Ctrl-C must not leave processes behind; each step is bounded
            if sampler is not None:
                sampler.stop()
            if sink is not None:
                sink.stop()
            if daemon is not None:
                submit.stop_daemon(daemon)
            if postfix is not None:
                postfix.stop()
            if cluster is not None:
                try:
                    cluster.stop("fast", timeout_s=60)
                finally:
                    if cluster.home != cluster.root and cluster.home.name.startswith("pg-"):
                        shutil.rmtree(cluster.home, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)


PG_STATS = {"shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "all",
            "pg_stat_statements.track_planning": "on"}
PG_STATEMENTS_SHOWN = 12


async def reset_pg_statements(url: str) -> None:
    """Create pg_stat_statements and zero it: the daemon's start-up is left out of what it reports."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def pg_statements(url: str) -> list[dict]:
    """The statements by execution time: calls, rows, execution and planning ms, and the query's first words."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT calls, rows, total_exec_time, total_plan_time, query FROM pg_stat_statements"
            " WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT $1",
            PG_STATEMENTS_SHOWN)
    finally:
        await conn.close()
    return [{"calls": r["calls"], "rows": r["rows"], "exec_ms": round(r["total_exec_time"], 1),
             "plan_ms": round(r["total_plan_time"], 1), "query": " ".join(r["query"].split())[:90]} for r in rows]


def summarize(mta: str, args, injection: Injection, complete: bool, received: dict, cpu: float,
              peak_rss: float, extra: dict) -> dict:
    problems: list[str] = []
    ids = [i for i in received.get("ids", []) if i is not None]
    delivered = len(set(ids))
    arrivals, sent = received.get("arrivals", []), received.get("sent", [])
    latencies = sorted(a - s for a, s in zip(arrivals, sent) if s is not None)
    p50 = p95 = p99 = None
    if latencies:
        p50, p95, p99 = (round(submit.percentile_ms(latencies, pct), 1) for pct in (50, 95, 99))
    last = max(arrivals, default=None)
    e2e = last - injection.first_sent if last and injection.first_sent else None
    if not complete:
        problems.append(f"--time-limit ran out with {delivered} of {injection.accepted} accepted at the sink")
    if delivered != injection.accepted:
        problems.append(f"sink has {delivered} distinct messages, {injection.accepted} accepted")
    if len(ids) != delivered:
        problems.append(f"{len(ids) - delivered} duplicate deliveries")
    if injection.refused:
        problems.append(f"refused at injection: {injection.refused}")
    if mta == "mtad":
        want = extra["dkim_signatures_expected"]
        signed = sum(n >= want for n in received.get("dkim", []))
        extra["dkim_signed_pct"] = round(100 * signed / len(arrivals), 2) if arrivals else None
        if arrivals and signed != len(arrivals):
            problems.append(f"only {signed} of {len(arrivals)} messages carry {want} DKIM signature(s)")
        if extra.get("states", {}).get("delivered", 0) != injection.accepted:
            problems.append(f"recipient states in PostgreSQL: {extra.get('states')}")
        if extra.get("daemon_warnings"):
            problems.append(f"the daemon logged {extra['daemon_warnings']} warnings/errors, first: "
                            + " | ".join(extra.get("daemon_warning_examples", [])[:3]))
    else:
        if extra.get("postfix_log_warnings"):
            problems.append(f"Postfix logged warnings/errors: {extra['postfix_log_warnings'][:3]}")
        if not extra.get("postfix_queue_empty", True):
            problems.append("Postfix's queue is not empty at the end")
    per_1k = 1000 / injection.accepted if injection.accepted else 0.0
    origin = injection.first_sent
    timeline = deliver.per_second(origin, injection.accepted_at, arrivals) if arrivals else []
    return {
        "mta": mta, "dkim": ("rsa+ed25519" if args.dual else "rsa") if mta == "mtad" else "none",
        "injected": args.messages, "accepted": injection.accepted, "delivered": delivered,
        "inject_s": round(injection.elapsed, 2), "pipelined": injection.pipelined,
        "accepted_per_s": round(injection.accepted / injection.elapsed, 1) if injection.elapsed else None,
        "e2e_s": round(e2e, 2) if e2e else None,
        "delivered_per_s": round(delivered / e2e, 1) if e2e and e2e > 0 else None,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
        "cpu_s_per_1k": round(cpu * per_1k, 2), "peak_rss_mb": peak_rss,
        "latencies_ms": [round(x * 1000, 1) for x in latencies],
        "timeline": timeline, **extra, "ok": not problems, "problems": problems,
    }


# -- report -------------------------------------------------------------------------------------------

METRICS = [("accepted_per_s", "accepted/s"), ("delivered_per_s", "delivered/s"), ("p50_ms", "p50 ms"),
           ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("cpu_s_per_1k", "CPU s/1k"),
           ("peak_rss_mb", "peak RSS (PSS) MB")]


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def pair_ratios(runs: list[dict]) -> list[dict]:
    pairs: dict[int, dict] = {}
    for run in runs:
        pairs.setdefault(run["pair"], {})[run["mta"]] = run
    out = []
    for number, pair in sorted(pairs.items()):
        if "mtad" in pair and "postfix" in pair:
            out.append({"pair": number, **{key: ratio(pair["mtad"][key], pair["postfix"][key])
                                           for key, _ in METRICS}})
    return out


def markdown(report: dict) -> str:
    runs, ratios = report["runs"], report["ratios"]
    lines = [f"# Relay benchmark {report['timestamp']}", "",
             f"{report['messages']} messages of {report['size']} bytes, {report['clients']} sessions, "
             f"{DOMAINS} Zipf-skewed domains, lean sink and injector (benchmarks/lean_smtp.py) on 127.0.0.1; "
             f"machine: nproc {report['machine']['nproc']}, "
             f"Python {report['machine']['python']}; mtad at {(report['source_at_start']['commit'] or '?')[:10]}"
             + (f" with uncommitted changes in {', '.join(report['source_at_start']['changed_under_mtad'])}"
                if report["source_at_start"]["changed_under_mtad"] else "") + ".",
             f"mtad: durable PostgreSQL, DKIM {report['mtad_dkim']}, {report.get('mtad_workers', 1)} worker(s), "
             f"connection_limit {CONNECTION_LIMIT}. "
             + (f"Postfix {report.get('postfix_version')}: relayed without signing (no DKIM built in), "
                f"default queue settings + default_destination_concurrency_limit = {CONNECTION_LIMIT}."
                if not report.get("postfix_missing") else f"**Postfix side missing**: {report['postfix_missing']}"),
             "", "| pair | MTA | " + " | ".join(t for _, t in METRICS)
             + " | delivered/injected | cores busy: MTA / injector / sink / machine | ok |",
             "|---:|---|" + "---:|" * len(METRICS) + "---:|---:|---|"]
    for run in runs:
        lines.append(f"| {run['pair']} | {run['mta']} | " + " | ".join(
            "n/a" if run.get(k) is None else str(run[k]) for k, _ in METRICS)
            + f" | {run['delivered']}/{run['injected']} | {cores_text(run)} | {'yes' if run['ok'] else 'NO'} |")
    lines += ["", "The harness's own cost, not counted for either MTA (benchmarks/lean_smtp.py; the injector's process "
              "also samples the MTA's PSS): " + "; ".join(f"{run['mta']} pair {run['pair']}: {harness_text(run)}"
                                                         for run in runs) + "."]
    lines += ["", "Medians:", "", "| MTA | " + " | ".join(t for _, t in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS)]
    for mta, med in report["medians"].items():
        lines.append(f"| {mta} | " + " | ".join("n/a" if med.get(k) is None else str(med[k]) for k, _ in METRICS)
                     + " |")
    if ratios:
        lines += ["", "Ratio mtad/Postfix (pair by pair, then the median):", "",
                  "| pair | " + " | ".join(t for _, t in METRICS) + " |", "|---:|" + "---:|" * len(METRICS)]
        for r in ratios + [{"pair": "median", **report["ratio_median"]}]:
            lines.append(f"| {r['pair']} | " + " | ".join("n/a" if r.get(k) is None else str(r[k])
                                                          for k, _ in METRICS) + " |")
    for run in runs:
        if run.get("pg_statements"):
            lines += pg_statements_table(run)
    if report.get("postfix_config"):
        lines += ["", "Postfix main.cf:", "", "```", report["postfix_config"].rstrip(), "```"]
    notes = sorted({note.split(": ", 1)[-1] for run in runs for note in run.get("postfix_log_notes", [])})
    if notes:
        lines += ["", "Notes from Postfix's log (the machine's clock, or the one relay host filling qmgr's active queue;"
                  " not problems of the configuration):",
                  ""] + [f"- {note}" for note in notes]
    problems = [f"- {run['mta']} pair {run['pair']}: {p}" for run in runs for p in run["problems"]]
    if problems:
        lines += ["", "Problems:", ""] + problems
    return "\n".join(lines) + "\n"


def pg_statements_table(run: dict) -> list[str]:
    """mtad's statements in one run, per message accepted (pg_stat_statements, from injection to the end)."""
    per = max(1, run["accepted"])
    lines = ["", f"PostgreSQL statements, mtad pair {run['pair']} (pg_stat_statements; per accepted message):", "",
             "| calls/msg | rows/call | exec ms/msg | plan ms/msg | statement |", "|---:|---:|---:|---:|---|"]
    for s in run["pg_statements"]:
        lines.append(f"| {s['calls'] / per:.3f} | {s['rows'] / max(1, s['calls']):.1f} | {s['exec_ms'] / per:.4f} "
                     f"| {s['plan_ms'] / per:.4f} | `{s['query'].replace('|', '/')}` |")
    return lines


def harness_text(run: dict) -> str:
    cost = run.get("harness_cpu_s_per_1k")
    if not cost:
        return "harness CPU n/a"
    split = run.get("mta_cpu_s_per_1k")
    own = f"; mtad CPU s/1k: daemon {split['daemon']}, PostgreSQL {split['postgres']}" if split else ""
    return (f"harness CPU s/1k: injector {cost['injector']} (of which PSS sampling {cost['rss_sampler']}), "
            f"sink {cost['sink']}{own}")


def cores_text(run: dict) -> str:
    busy = run.get("cores_busy")
    return " / ".join(str(busy[k]) for k in ("mta", "injector", "sink", "machine")) if busy else "n/a"


def other_postfix_masters() -> list[int]:
    """Postfix master processes already running (the system's or another instance): they would share the cores."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe").endswith("/postfix/sbin/master"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colours = {"mtad": "tab:blue", "postfix": "tab:orange"}
    styles = ["-", "--", ":", "-."]  # one per pair, so the pairs stay apart
    for run in report["runs"]:
        style = styles[(run["pair"] - 1) % len(styles)]
        seconds = [row["second"] for row in run["timeline"]]
        arrived = [row["arrived"] for row in run["timeline"]]
        left.plot(seconds, arrived, color=colours[run["mta"]], alpha=0.8,
                  linestyle=style, label=f"{run['mta']} pair {run['pair']}")
        lat = run.get("latencies_ms") or []
        if lat:
            right.plot(lat, [100 * (i + 1) / len(lat) for i in range(len(lat))], color=colours[run["mta"]],
                       alpha=0.8, linestyle=style, label=f"{run['mta']} pair {run['pair']}")
    left.set(title="delivered per second (at the sink)", xlabel="seconds since first injection",
             ylabel="messages/s")
    right.set(title="submit -> delivered latency (CDF)", xlabel="ms", ylabel="% of messages", xscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"mtad (DKIM {report['mtad_dkim']}) vs Postfix (no DKIM): {report['messages']} msgs, "
                 f"{report['clients']} sessions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def postfix_version() -> str | None:
    try:
        done = subprocess.run([sbin("postconf"), "-d", "-h", "mail_version"], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired, TypeError):
        return None


def source_state() -> dict:
    """The commit mtad ran from and files changed in the working tree under mtad/ (the daemon runs the tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, timeout=10,
                                  stdin=subprocess.DEVNULL).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "changed_under_mtad": [line[3:] for line in git("status", "--porcelain", "--", "mtad").splitlines()]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = "--mtad-only given" if args.mtad_only else postfix_missing_reason()
    recipients = recipients_for(args)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    postfix_config = None
    source = source_state()
    others = [] if missing else other_postfix_masters()
    if others:  # not ours to stop; say so, the numbers would be skewed
        print(f"warning: Postfix master process(es) already running: {others} (stop the system postfix for a "
              f"fair run)", file=sys.stderr)
    with Progress() as progress:
        progress.log(f"relay benchmark: {args.messages} messages x {args.pairs} pair(s), {args.clients} sessions, "
                     f"mtad DKIM {'rsa+ed25519' if args.dual else 'rsa'}"
                     + (f"; Postfix side missing: {missing}" if missing else "; Postfix without DKIM"))
        for pair in range(1, args.pairs + 1):
            for mta in ("mtad", "postfix"):
                if mta == "postfix" and missing:
                    continue
                label = f"pair {pair} {mta}"
                try:
                    run = run_once(mta, args, recipients, progress, label)
                except RuntimeError as exc:
                    if mta == "postfix" and pair == 1:  # fall back to mtad only, saying why
                        missing = f"the private Postfix instance failed: {exc}"
                        progress.log(f"Postfix side missing: {missing}")
                        continue
                    raise
                run["pair"] = pair
                runs.append(run)
                if mta == "postfix" and postfix_config is None:
                    postfix_config = postfix_main_cf(Path("<tmpdir>"), 0).replace(":0\n", ":<sink port>\n")
                progress.log(f"{label}: accepted/s {run['accepted_per_s']}, delivered/s {run['delivered_per_s']}, "
                             f"p50/p95/p99 {run['p50_ms']}/{run['p95_ms']}/{run['p99_ms']} ms, CPU s/1k "
                             f"{run['cpu_s_per_1k']}, peak RSS {run['peak_rss_mb']} MB; {harness_text(run)}"
                             + ("" if run["ok"] else f"; PROBLEMS: {run['problems']}"))
    medians = {mta: {key: median([r[key] for r in runs if r["mta"] == mta]) for key, _ in METRICS}
               for mta in ("mtad", "postfix") if any(r["mta"] == mta for r in runs)}
    ratios = pair_ratios(runs)
    report = {"timestamp": stamp, "machine": submit.machine(), "source_at_start": source, "source_at_end": source_state(), "messages": args.messages, "clients": args.clients,
              "pairs": args.pairs, "size": args.size, "domains": DOMAINS,
              "mtad_dkim": "rsa-2048+ed25519" if args.dual else "rsa-2048", "mtad_workers": args.workers,
              "postfix_dkim": "none (Postfix relayed without signing)", "postfix_missing": missing,
              "postfix_version": None if missing else postfix_version(), "postfix_config": postfix_config,
              "sink": "benchmarks/lean_smtp.py (asyncio.Protocol, separate process, records X-Bench-Sent and arrival)",
              "injector": "benchmarks/lean_smtp.py (asyncio.Protocol in the benchmark's process, "
                          + ("MAIL/RCPT/DATA pipelined)" if args.pipelining else "no pipelining)"),
              "other_postfix_masters_at_start": others, "runs": runs, "medians": medians, "ratios": ratios,
              "ratio_median": {key: median([r[key] for r in ratios]) for key, _ in METRICS} if ratios else None,
              "ok": all(r["ok"] for r in runs)}
    base = args.out / f"relay-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    base.with_suffix(".md").write_text(text)
    plot(report, base.with_suffix(".png"))
    print(text)
    print(f"wrote {base}.json, {base}.md, {base}.png")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, deliver._sigterm_as_sigint)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; sink, daemon, PostgreSQL and Postfix stopped, temp dirs removed", file=sys.stderr)
        sys.exit(130)

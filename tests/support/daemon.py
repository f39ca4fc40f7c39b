"""The daemon under test: in-process (same event loop as the test) or as a real `mtad run` subprocess."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mtad.app import Daemon
from mtad.config import parse_settings
from mtad.tenants.passwords import hash_password
from mtad.tenants.store import TenantStore

PASSWORD = "correct horse battery staple"
TENANTS = {"acme": "acme.example", "globex": "globex.example"}


async def add_test_tenants(pool) -> None:
    store = TenantStore(pool)
    password_hash = hash_password(PASSWORD)
    for name, domain in TENANTS.items():
        await store.insert_tenant(name, password_hash)
        await store.add_tenant_domain(name, domain)


def daemon_document(db_url: str, state_dir: Path, **submission: object) -> dict:
    return {
        "hostname": "mtad.test",
        "state_dir": str(state_dir),
        "shutdown_grace": "5s",
        "database": {"url": db_url, "pool_min_size": 1, "pool_max_size": 4},
        "submission": {"listen": ["127.0.0.1:0"], "implicit_tls_listen": ["127.0.0.1:0"], **submission},
        "queue": {"reclaim_interval": "1s"},
        "delivery": {"enabled": False},  # submission tests look at the queue; delivery tests switch it on
        "http": {"listen": ["127.0.0.1:0"]},
    }


async def start_in_process(db_url: str, state_dir: Path, **submission: object) -> Daemon:
    daemon = Daemon(parse_settings(daemon_document(db_url, state_dir, **submission), {}), None)
    await daemon.start()
    return daemon


def ports_of(daemon: Daemon) -> tuple[int, int]:
    """(STARTTLS port, implicit TLS port) of an in-process daemon."""
    starttls, implicit = daemon.listeners.servers
    return starttls.sockets[0].getsockname()[1], implicit.sockets[0].getsockname()[1]


def write_config(path: Path, document: dict) -> Path:
    def key(k: str) -> str:  # bare where TOML allows it, quoted otherwise ("*" routes, dotted domains)
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, dict) else "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"

    lines = [f"{key} = {value(v)}" for key, v in document.items() if not isinstance(v, dict)]
    for section, table in document.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines += [f"{key} = {value(v)}" for key, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonProcess:
    """`python -m mtad --config FILE run` with JSON logs; knows its ports from the daemon.ready event."""

    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    ports: list[int] = field(default_factory=list)

    def start(self, timeout_s: float = 30) -> None:
        self.log_path = self.config_path.with_suffix(f".{int(time.time() * 1000)}.log")
        env = {**os.environ, "MTAD_LOGGING_FORMAT": "json", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtad", "--config", str(self.config_path), "run"],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "daemon.ready":
                    self.ports = [int(address.rsplit(":", 1)[1]) for address in event["listening"]]
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"mtad exited with {self.process.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"mtad did not become ready: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the daemon's log, for an assertion's message."""
        return self.log_path.read_text()[-chars:] if self.log_path is not None and self.log_path.exists() else ""

    def events(self) -> list[dict]:
        if self.log_path is None or not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "unparsed", "line": line})
        return events

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


async def until(predicate, timeout_s: float = 30, interval_s: float = 0.1):
    """Call `predicate()` (plain or async) until it gives a true value (returned) or `timeout_s` passed
    (its last value)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(interval_s)


def delivery_document(world, shaping_path: Path, **delivery: object) -> dict:
    """The [delivery] table that points a daemon at a RemoteWorld (its DNS and its sinks' port)."""
    return {
        "nameservers": ["127.0.0.1"],
        "dns_port": world.dns.port,
        "dns_timeout": "2s",
        "smtp_port": world.smtp_port,
        "shaping_file": str(shaping_path),
        "connect_timeout": "2s",
        "command_timeout": "5s",
        "data_timeout": "5s",
        **delivery,
    }


def write_shaping(path: Path, default: dict | None = None, **sections: dict) -> Path:
    """A shaping.toml for tests; `default` is the [default] table, sections like provider={...}."""
    document = {"default": {"dead_for": "1s", "backoff_for": "1s", **(default or {})}, **sections}
    lines = []
    for name, table in document.items():
        if name in ("provider", "domain"):
            for sub, values in table.items():
                lines.append(f'[{name}."{sub}"]')
                lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_delivering(
    db_url: str, state_dir: Path, world, shaping_path: Path, feedback: dict | None = None, **delivery: object
) -> Daemon:
    document = daemon_document(db_url, state_dir)
    document["delivery"] = delivery_document(world, shaping_path, **delivery)
    if feedback:
        document["feedback"] = feedback
    document["queue"] = {"reclaim_interval": "1s", "poll_interval": "200ms", "lease": "30s", "gauge_interval": "200ms"}
    daemon = Daemon(parse_settings(document, {}), None)
    await daemon.start()
    return daemon


def delivering_process_document(
    db_url: str, state_dir: Path, world, shaping_path: Path, queue: dict | None = None, **delivery: object
) -> dict:
    """A `mtad run` config that submits and delivers into a RemoteWorld (crash and fault tests)."""
    document = daemon_document(db_url, state_dir)
    document["database"] = {**document["database"], "pool_max_size": 8}
    document["delivery"] = delivery_document(world, shaping_path, **delivery)
    document["queue"] = {"reclaim_interval": "1s", "poll_interval": "1s", "lease": "10s", **(queue or {})}
    return document


# -- a bounded submission load ------------------------------------------------------------------------

# AssertionError: RawSMTP asserts a 220 greeting and a 220 to STARTTLS (a draining daemon answers 421).
_CONNECTION_TROUBLE = (OSError, EOFError, asyncio.TimeoutError, asyncio.IncompleteReadError, AssertionError)


@dataclass
class Attempt:
    """One message offered over SMTP: its recipients, the reply to its end of DATA (0: none), and when."""

    number: int
    recipients: list[str]
    code: int = 0
    sent_at: float = 0.0  # time.monotonic() when the final dot went out (0: never got that far)
    replied_at: float = 0.0


@dataclass
class SubmissionLoad:
    """`sessions` SMTP clients submit messages until `messages` were answered 250, `max_attempts` were
    offered, or `deadline_s` passed, whichever comes first: bounded in count and in time.

    Every message gets fresh recipients from `recipients_of(number)` and carries its number in an
    `X-Load-Id` header; a client that loses its connection, or gets a 4xx where it needs a 2xx, records
    the attempt as not accepted and reconnects (to `port()`, which may change across daemon restarts)."""

    port: Callable[[], int | None]
    recipients_of: Callable[[int], list[str]]
    messages: int
    sessions: int = 4
    deadline_s: float = 120.0
    max_attempts: int = 0  # 0: three times `messages`
    sender: str = "news@acme.example"
    login: tuple[str, str] = ("acme", PASSWORD)
    attempts: list[Attempt] = field(default_factory=list)
    session_replies: list[tuple[float, int]] = field(default_factory=list)  # (when, code) of AUTH/MAIL refusals

    def __post_init__(self) -> None:
        self._numbers = iter(range(1, (self.max_attempts or 3 * self.messages) + 1))

    @property
    def accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.code == 250]

    @property
    def not_accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.code != 250]

    def accepted_recipients(self) -> set[str]:
        return {r for a in self.accepted for r in a.recipients}

    async def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        await asyncio.gather(*(self._session(deadline) for _ in range(self.sessions)))

    async def until_accepted(self, count: int, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.accepted) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self.accepted) >= count

    def _done(self, deadline: float) -> bool:
        return len(self.accepted) >= self.messages or time.monotonic() > deadline

    async def _session(self, deadline: float) -> None:
        from support.smtp_client import RawSMTP

        while not self._done(deadline):
            port = self.port()
            client = None
            try:
                if port is None:
                    raise ConnectionRefusedError("daemon not running")
                client, _ = await RawSMTP.open(port)
                if not await self._log_in(client):
                    raise ConnectionResetError("login refused")
                while not self._done(deadline):
                    number = next(self._numbers, None)
                    if number is None:
                        return
                    attempt = Attempt(number, self.recipients_of(number))
                    self.attempts.append(attempt)
                    if not await self._submit(client, attempt):
                        break
            except _CONNECTION_TROUBLE:
                pass
            finally:
                if client is not None:
                    client.writer.transport.abort()
            await asyncio.sleep(0.1)

    async def _log_in(self, client) -> bool:
        await client.command("EHLO load.test")
        await client.starttls()
        await client.command("EHLO load.test")
        code, _ = await client.login(*self.login)
        if code != 235:
            self.session_replies.append((time.monotonic(), code))
        return code == 235

    async def _submit(self, client, attempt: Attempt) -> bool:
        """False when the session should be dropped (any reply but the expected one)."""
        code, _ = await client.command(f"MAIL FROM:<{self.sender}>")
        if code != 250:
            self.session_replies.append((time.monotonic(), code))
            return False
        for rcpt in attempt.recipients:
            if (await client.command(f"RCPT TO:<{rcpt}>"))[0] != 250:
                return False
        if (await client.command("DATA"))[0] != 354:
            return False
        body = (
            f"From: {self.sender}\r\nSubject: load {attempt.number}\r\n"
            f"Message-ID: <load-{attempt.number}@load.test>\r\nX-Load-Id: {attempt.number}\r\n\r\n"
            f"message {attempt.number}\r\n."
        ).encode()
        attempt.sent_at = time.monotonic()
        attempt.code, _ = await client.command(body)
        attempt.replied_at = time.monotonic()
        if attempt.code == 250:
            return True
        await client.command("RSET")
        await asyncio.sleep(0.2)  # as a real client backs off after a 4xx (and the attempts last the outage)
        return 400 <= attempt.code < 500 and attempt.code != 421

"""The composition root: builds every part from the settings and owns the daemon's life cycle.

Start inside-out (after uvicorn's server.py): settings -> database (embedded cluster when no URL) -> pool ->
schema check or migration -> stores -> TLS -> SMTP listeners last -> READY=1.
Stop in reverse: stop accepting, finish in-flight SMTP transactions within `shutdown_grace`, STOPPING=1,
close the pool, stop the embedded cluster if this process started it. A second SIGTERM/SIGINT exits at once.
SIGHUP re-reads the config file: limits and tenants apply to the next command, no connection is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import secrets
import signal
import ssl
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from mtad.cluster.membership import Membership
from mtad.cluster.slots import ConnectionSlots
from mtad.cluster.store import ClusterStore
from mtad.cluster.workers import WORKER_ENV, shifted_port, worker_index
from mtad.config import ConfigError, Settings, load_settings
from mtad.db.pool import connect
from mtad.db.embedded import EmbeddedPostgres
from mtad.db.migrate import check_schema, migrate
from mtad.db.pool import DATABASE_UNAVAILABLE, create_pool
from mtad.ingest.credentials import CredentialVerifier
from mtad.ingest.handler import SHUTTING_DOWN, SubmissionHandler
from mtad.ingest.protocol import SubmissionSMTP
from mtad.ingest.server import SubmissionListeners, parse_listen_address
from mtad.ingest.tls import ensure_self_signed, server_context
from mtad.observe import systemd
from mtad.observe.health import HealthEndpoints
from mtad.observe.logs import log_event
from mtad.observe.metrics import NODE_INFO
from mtad.observe.tasks import cancel_and_wait
from mtad.observe.queue_gauges import keep_gauges_fresh, measure_event_loop_lag
from mtad.deliver.copy import CopyMaker, FeedbackAddressing
from mtad.deliver.message_cache import MessageCache
from mtad.feedback.inbound import MAX_FEEDBACK_BYTES, FeedbackHandler
from mtad.feedback.parse import load_bounce_rules
from mtad.feedback.secret import load_or_create_key
from mtad.feedback.store import FeedbackStore
from mtad.feedback.unsubscribe_page import UnsubscribeEndpoint
from mtad.deliver.resolver import RouteResolver, parse_static_routes
from mtad.policy.log_privacy import LogPrivacy
from mtad.policy.shaping import ShapingRules, parse_shaping
from mtad.queue.claimer import Claimer
from mtad.queue.group_commit import GroupCommit
from mtad.queue.outcome_writer import OutcomeWriter
from mtad.queue.store import QueueStore
from mtad.queue.wakeup import ArrivalSignal, QueueWakeup
from mtad.schedule.runner import DeliveryRunner
from mtad.sign.dkim import DkimSigner
from mtad.sign.keys import load_key_directory
from mtad.tenants.store import TenantStore
from mtad.web.server import HttpServer

log = logging.getLogger("mtad.app")


def embedded_cluster(settings: Settings) -> EmbeddedPostgres | None:
    """The private cluster under state_dir/pg, or None when a database URL is configured."""
    if settings.database.url:
        return None
    return EmbeddedPostgres(settings.state_path / "pg", port=settings.database.embedded_port)


def load_shaping(settings: Settings) -> ShapingRules:
    """The shaping rules file (config/shaping.toml style), or the built-in defaults when none is set."""
    path = settings.delivery.shaping_file
    if not path:
        return ShapingRules()
    try:
        return parse_shaping(tomllib.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ConfigError(f"delivery.shaping_file: no such file {path}") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"delivery.shaping_file: {path}: {exc}") from None


def node_name(settings: Settings) -> str:
    """The owner name on leases: unique per process, readable in `mtad queue show`."""
    return f"{settings.hostname}:{os.getpid()}:{secrets.token_hex(3)}"


def unsubscribe_base_url(settings: Settings, http: HttpServer | None) -> str:
    """The configured public base, else the first HTTP listener as bound (development only: not https)."""
    if settings.feedback.unsubscribe_url:
        return settings.feedback.unsubscribe_url
    if worker_index() and settings.http.listen:  # links to worker 0's port: they must outlive this worker
        return f"http://{settings.http.listen[0]}/u/"
    if http is not None and http.bound:
        host, port = http.bound[0]
        return f"http://{host}:{port}/u/"
    return f"http://{settings.hostname}/u/"


def database_url(settings: Settings) -> str:
    cluster = embedded_cluster(settings)
    return cluster.url() if cluster else settings.database.url


async def prepare_database(settings: Settings) -> EmbeddedPostgres | None:
    """Start the embedded cluster when the config uses one and bring the schema up to date (a daemon before
    its pool; a supervisor before its workers, which then find both ready). Returns the cluster if this call
    started it."""
    cluster = embedded_cluster(settings)
    started = cluster if cluster is not None and await asyncio.to_thread(cluster.start) else None
    try:
        conn = await connect(cluster.url() if cluster else settings.database.url, settings.database)
        try:
            if settings.database.auto_migrate:
                applied = await migrate(conn)
                if applied:
                    log_event(log, "schema.migrated", versions=[m.version for m in applied])
            await check_schema(conn)
        finally:
            await conn.close()
    except BaseException:
        if started is not None:
            await asyncio.to_thread(started.stop)
        raise
    return started


class Daemon:
    def __init__(self, settings: Settings, config_path: Path | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.pool: asyncpg.Pool | None = None
        self.listeners: SubmissionListeners | None = None
        self._cluster_started: EmbeddedPostgres | None = None
        self._tls: ssl.SSLContext | None = None
        self._stop_requested = asyncio.Event()
        self._stop_requested_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self.runner: DeliveryRunner | None = None
        self.wakeup: QueueWakeup | None = None
        self.http: HttpServer | None = None
        self.feedback_servers: list[asyncio.Server] = []
        self.pending_recipients = 0  # refreshed by the gauge task, for back-pressure
        self._feedback_sessions: set = set()
        self.shaping = load_shaping(settings)
        self.node_id = node_name(settings)
        self.membership: Membership | None = None

    async def start(self) -> None:
        settings = self.settings
        store, url = await self._open_database(settings)
        cluster_store = ClusterStore(self.pool)
        self.membership = Membership(
            cluster_store,
            self.node_id,
            settings.cluster,
            ConnectionSlots(cluster_store, self.node_id, settings.cluster.dead_after),
        )
        NODE_INFO.labels(self.node_id, str(worker_index() or 0)).set(1)
        self.verifier = CredentialVerifier(TenantStore(self.pool))
        self.feedback_key = load_or_create_key(settings.feedback.secret_file, settings.state_path)
        self.privacy = LogPrivacy(
            settings.logging.mask_client_ips, settings.logging.pseudonymise_recipients, self.feedback_key
        )
        rules_file = settings.feedback.bounce_rules_file
        self.bounce_rules = load_bounce_rules(Path(rules_file) if rules_file else None)
        if settings.http.listen:
            await self._start_http(settings)
        listeners_up = lambda: bool(self.listeners and self.listeners.servers)  # noqa: E731
        self._tasks.append(
            asyncio.create_task(
                keep_gauges_fresh(self.pool, settings.queue.gauge_interval, listeners_up, self._set_depth)
            )
        )
        self._tasks.append(asyncio.create_task(measure_event_loop_lag()))
        if settings.delivery.enabled:
            self.runner = self._build_runner(store, url)
            self.membership.runner = self.runner
        await self.membership.join()
        self._tasks.append(asyncio.create_task(self.membership.run(), name="cluster-heartbeat"))
        if self.runner is not None:
            self.runner.start()
        if settings.feedback.listen:
            await self._start_feedback_listener(settings)
        await self._start_submission(settings, store)
        self._tasks.append(asyncio.create_task(self._reclaim_expired_leases(store)))
        interval = systemd.watchdog_interval_s()
        if interval:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        worker = worker_index()
        systemd.notify("READY=1\nSTATUS=accepting mail" + (f"\n{WORKER_ENV}={worker}" if worker is not None else ""))
        log_event(log, "daemon.ready", listening=[f"{h}:{p}" for h, p in self.listeners.bound_addresses])

    async def _open_database(self, settings: Settings) -> tuple[QueueStore, str]:
        self._cluster_started = await prepare_database(settings)
        url = database_url(settings)
        self.pool = await create_pool(url, settings.database)
        return QueueStore(self.pool), url

    async def _start_http(self, settings: Settings) -> None:
        """Unsubscribe pages, /metrics, /healthz, /readyz."""
        endpoint = UnsubscribeEndpoint(
            FeedbackStore(self.pool),
            self.feedback_key,
            lambda: datetime.now(timezone.utc),
            on_unsubscribed=self._suppressed_locally,
            privacy=self.privacy,
        )
        health = HealthEndpoints(self.pool, lambda: bool(self.listeners and self.listeners.servers))
        # Worker k of `mtad run --workers N` listens on the configured ports + k: each is its own scrape target.
        listen = tuple(shifted_port(address, worker_index() or 0) for address in settings.http.listen)
        self.http = HttpServer(listen, endpoint.routes() + health.routes())
        await self.http.start()

    async def _start_submission(self, settings: Settings, store: QueueStore) -> None:
        """The SMTP submission listeners: started last, so nothing is accepted before the rest is up."""
        self._tls = self._load_tls(settings)
        arrivals = ArrivalSignal(self.pool, self.wakeup)
        self.handler = SubmissionHandler(
            settings=settings.submission,
            hostname=settings.hostname,
            store=GroupCommit(store),
            verifier=self.verifier,
            on_queued=arrivals.queued,
            privacy=self.privacy,
            queue_depth=lambda: self.pending_recipients,
        )
        self.listeners = SubmissionListeners(
            self.handler, lambda: self.settings, lambda: self._tls, reuse_port=worker_index() is not None
        )
        await self.listeners.start()

    def _build_runner(self, store: QueueStore, url: str) -> DeliveryRunner:
        settings = self.settings
        delivery = settings.delivery
        wakeup = QueueWakeup(lambda: connect(url, settings.database), on_suppressed=lambda p: runner.suppressed(p))
        self.wakeup = wakeup
        self._tasks.append(asyncio.create_task(wakeup.run(), name="queue-listener"))
        owner = self.node_id
        clock = lambda: datetime.now(timezone.utc)  # noqa: E731
        resolver = RouteResolver(
            nameservers=delivery.nameservers,
            dns_port=delivery.dns_port,
            timeout_s=delivery.dns_timeout,
            smtp_port=delivery.smtp_port,
            static_routes=parse_static_routes(delivery.routes, delivery.smtp_port),
            ipv6=delivery.ipv6,
        )
        keys = load_key_directory(settings.dkim_key_path) if settings.dkim_key_path.is_dir() else {}
        self.signer = DkimSigner(keys) if keys else None
        addressing = FeedbackAddressing(
            self.feedback_key, settings.feedback.bounce_domain.lower(), unsubscribe_base_url(settings, self.http)
        )
        claimer = Claimer(
            store,
            wakeup,
            owner=owner,
            batch_size=settings.queue.claim_batch_size,
            lease_s=settings.queue.lease,
            poll_interval_s=settings.queue.poll_interval,
            clock=clock,
        )
        runner = DeliveryRunner(
            store=store,
            claimer=claimer,
            resolver=resolver,
            shaping=lambda: self.shaping,
            messages=MessageCache(store),
            copies=CopyMaker(addressing, lambda: self.signer),
            writer=OutcomeWriter(store, owner, clock),
            settings=delivery,
            ehlo_name=delivery.ehlo_name or settings.hostname,
            lease_s=settings.queue.lease,
            bounce_rules=self.bounce_rules,
            slots=self.membership.slots,
            rate_tokens=self.membership.store.take_rate_tokens,
            announce_throttle=self.membership.announce_throttle,
        )
        return runner

    def _set_depth(self, pending_recipients: int) -> None:
        self.pending_recipients = pending_recipients

    def _suppressed_locally(self, payload: str) -> None:
        """Tell this node's deliveries at once (other nodes hear the NOTIFY a moment later)."""
        if self.runner is not None:
            self.runner.suppressed(payload)

    async def _start_feedback_listener(self, settings: Settings) -> None:
        handler = FeedbackHandler(
            store=FeedbackStore(self.pool),
            key=self.feedback_key,
            bounce_domain=settings.feedback.bounce_domain,
            fbl_local_parts=settings.feedback.fbl_local_parts,
            rules=self.bounce_rules,
            clock=lambda: datetime.now(timezone.utc),
            privacy=self.privacy,
        )
        loop = asyncio.get_running_loop()
        for address in settings.feedback.listen:
            host, port = parse_listen_address(address)
            self.feedback_servers.append(
                await loop.create_server(
                    lambda: SubmissionSMTP(
                        handler,
                        registry=self._feedback_sessions,
                        hostname=settings.hostname,
                        ident="ESMTP mtad",
                        data_size_limit=MAX_FEEDBACK_BYTES,
                        enable_SMTPUTF8=True,
                        decode_data=False,
                        timeout=settings.submission.idle_timeout,
                    ),
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=worker_index() is not None,
                )
            )

    def _load_tls(self, settings: Settings) -> ssl.SSLContext:
        submission = settings.submission
        if submission.tls_cert_file:
            return server_context(Path(submission.tls_cert_file), Path(submission.tls_key_file))
        cert, key = ensure_self_signed(settings.state_path / "tls", settings.hostname)
        return server_context(cert, key)

    async def _reclaim_expired_leases(self, store: QueueStore) -> None:
        """Give the recipients of a node that died back to the queue once their lease has run out."""
        while True:
            await asyncio.sleep(self.settings.queue.reclaim_interval)
            try:
                if self.runner is not None:
                    await self.runner.keep_leases_if_due()  # never reclaim our own after an outage
                reclaimed = await store.reclaim_expired(datetime.now(timezone.utc))
            except DATABASE_UNAVAILABLE as exc:
                log_event(log, "queue.reclaim_failed", logging.WARNING, error=type(exc).__name__)
                continue
            except Exception:  # noqa: BLE001 - a bug in one round must not end reclaiming for good
                log.exception("reclaiming expired leases failed")
                continue
            if reclaimed:
                log_event(log, "queue.leases_reclaimed", recipients=reclaimed)

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def request_stop(self) -> None:
        now = time.monotonic()
        if self._stop_requested.is_set():
            # One Ctrl-C under `make run` reaches us twice (from the terminal and from make): only a signal
            # that comes later is an operator asking again.
            if now - self._stop_requested_at < 1.0:
                return
            log_event(log, "daemon.forced_exit")
            os._exit(1)
        log_event(log, "daemon.stopping")
        self._stop_requested_at = now
        self._stop_requested.set()

    def reload(self) -> None:
        try:
            new = load_settings(self.config_path)
            shaping = load_shaping(new)
        except ConfigError as exc:
            log_event(log, "config.reload_failed", logging.ERROR, error=str(exc))
            return
        if new.submission.listen != self.settings.submission.listen or new.database != self.settings.database:
            log_event(log, "config.restart_needed", logging.WARNING, reason="listen addresses or database changed")
        try:
            self._tls = self._load_tls(new)
        except (OSError, ssl.SSLError) as exc:
            log_event(log, "config.tls_reload_failed", logging.ERROR, error=str(exc))
        self.settings = new
        self.shaping = shaping
        if new.dkim_key_path.is_dir():
            keys = load_key_directory(new.dkim_key_path)
            self.signer = DkimSigner(keys) if keys else None
        self.handler.apply_settings(new.submission)
        self.verifier.forget()
        log_event(log, "config.reloaded")

    async def wait_until_stop_requested(self) -> None:
        await self._stop_requested.wait()

    async def stop(self) -> None:
        if self.listeners is not None:
            self.listeners.close()
            self.handler.draining = True
            cut = await self.listeners.drain(self.settings.shutdown_grace, SHUTTING_DOWN)
            if cut:
                log_event(log, "daemon.transactions_cut", logging.WARNING, sessions=cut)
        for server in self.feedback_servers:
            server.close()
        for session in list(self._feedback_sessions):
            session.close_with(SHUTTING_DOWN)
        if self.runner is not None:
            await self.runner.stop(self.settings.shutdown_grace)
        if self.http is not None:
            await self.http.stop()
        systemd.notify("STOPPING=1")
        await cancel_and_wait(self._tasks)
        if self.membership is not None:
            await self.membership.leave()  # after the heartbeat task, which would register us again
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 10)
            except TimeoutError:
                self.pool.terminate()  # a query stuck on a dead server must not keep the daemon from exiting
        if self._cluster_started is not None:
            await asyncio.to_thread(self._cluster_started.stop)
        log_event(log, "daemon.stopped")


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every inbound session and pooled outbound connection is a
    descriptor, and 10,000 destination sites keep thousands open (systemd's unit sets the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit we were given


async def run_daemon(settings: Settings, config_path: Path | None) -> None:
    raise_open_file_limit()
    daemon = Daemon(settings, config_path)
    daemon.install_signal_handlers()
    try:
        await daemon.start()
        await daemon.wait_until_stop_requested()
    finally:
        await daemon.stop()

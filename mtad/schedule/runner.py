"""The delivery runner: the thin async driver around the pure scheduler.

claim loop:    lease due recipients while the scheduler holds fewer than `max_active_recipients`, route
               them (static route or MX), and hand them to the scheduler; no route -> bounce or defer.
dispatch loop: ask the scheduler what may start now and start it; sleep until it says, or until woken.
a delivery:    message (signed once) -> pooled connection -> one transaction -> outcomes recorded in
               PostgreSQL -> feedback to the site's window. Outcomes are committed before the recipients
               leave the scheduler, so a crash repeats at most the attempts in flight.
Stopping: no new claims or dispatches, in-flight deliveries finish within the grace period, everything
still held is released to the queue (no attempt counted), so a clean stop causes no duplicates.
Cluster (mtad.cluster): connections hold cluster-wide slots; the membership heartbeat tells the runner how
many nodes share each site's rates, which sites others wait for, and which throttled another node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

from mtad.cluster.slots import ConnectionSlots
from mtad.config import DeliverySettings
from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.deliver.connection import SessionFailure, Timeouts
from mtad.deliver.copy import CopyMaker
from mtad.deliver.message_cache import MessageCache
from mtad.deliver.pool import ConnectionPool, NoConnectionSlot
from mtad.deliver.resolver import RouteResolver
from mtad.deliver.transaction import run_transaction
from mtad.model import Claim, RecipientState, RouteFailure
from mtad.observe.logs import log_event
from mtad.observe.tasks import cancel_and_wait
from mtad.observe.metrics import (
    ATTEMPTS,
    BOUNCES,
    CLUSTER_SLOT_WAITS,
    CLUSTER_SLOTS_HELD,
    DELIVERY_LATENCY,
    POSTPONED,
    SESSION_FAILURES,
    SITE_BACKOFF,
    SITE_IN_FLIGHT,
    SITE_PENDING,
    SITE_WINDOW,
    SUPPRESSED_BEFORE_ATTEMPT,
)
from mtad.policy.bounce_rules import BounceRules, classify_reply
from mtad.policy.outcome import next_state, unreachable_site_reply
from mtad.policy.recent_suppressions import RecentSuppressions
from mtad.policy.shaping import ShapingRules
from mtad.queue.claimer import Claimer
from mtad.queue.outcome_writer import OutcomeWriter
from mtad.queue.store import Outcome, QueueStore
from mtad.schedule.engine import Dispatch, Feedback, Scheduler

log = logging.getLogger("mtad.deliver")

_RATE_TOKEN_INTERVAL_S = 0.05


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class DeliveryRunner:
    def __init__(
        self,
        *,
        store: QueueStore,
        claimer: Claimer,
        resolver: RouteResolver,
        shaping: Callable[[], ShapingRules],
        messages: MessageCache,
        copies: CopyMaker,
        writer: OutcomeWriter,
        settings: DeliverySettings,
        ehlo_name: str,
        lease_s: float,
        bounce_rules: BounceRules = BounceRules(),
        slots: ConnectionSlots | None = None,
        rate_tokens: Callable[[str, float, float, int], Awaitable[int]] | None = None,
        announce_throttle: Callable[[str, str | None], None] = lambda site, error: None,
    ) -> None:
        self.bounce_rules = bounce_rules
        self.slots = slots
        self.rate_tokens = rate_tokens
        self.announce_throttle = announce_throttle
        self.store = store
        self.claimer = claimer
        self.resolver = resolver
        self.shaping = shaping
        self.messages = messages
        self.copies = copies
        self.writer = writer
        self.recent_suppressions = RecentSuppressions(ttl_s=lease_s * 2)
        self.settings = settings
        self.lease_s = lease_s
        self.timeouts = Timeouts(settings.connect_timeout, settings.command_timeout, settings.data_timeout)
        self.pool = ConnectionPool(ehlo_name=ehlo_name, timeouts=self.timeouts, slots=slots)
        self.scheduler = Scheduler(copies.one_recipient_per_copy)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._deliveries: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._leases_renewed_at = time.monotonic()

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self.writer.run(), name="outcome-writer"),
            asyncio.create_task(self._claim_loop(), name="claim-loop"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch-loop"),
            asyncio.create_task(self._housekeeping(), name="delivery-housekeeping"),
            asyncio.create_task(self._keep_leases(), name="lease-keeper"),
        ]
        if self.rate_tokens is not None:
            self._loops.append(asyncio.create_task(self._take_rate_tokens(), name="rate-tokens"))

    async def stop(self, grace_s: float) -> None:
        writer_task, *others = self._loops
        await cancel_and_wait(others)
        if self._deliveries:
            _, still = await asyncio.wait(set(self._deliveries), timeout=grace_s)
            await cancel_and_wait(still)
        # Outcomes of finished (and of cut) attempts first, then everything still leased goes back: what the
        # scheduler held, and claims the cancelled claim loop had committed but not yet handed over.
        await self.writer.drained(timeout_s=5.0)
        await cancel_and_wait([writer_task])
        try:
            await self.store.release_owner(self.claimer.owner, _utcnow())
        except DATABASE_UNAVAILABLE:
            pass  # their leases expire and another start reclaims them
        await self.pool.close_all()

    # -- claiming -----------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while True:
            room = self.settings.max_active_recipients - self.scheduler.held
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                claims = await self.claimer.next_batch(room)
            except DATABASE_UNAVAILABLE as exc:
                log_event(log, "queue.claim_failed", logging.WARNING, error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            try:
                await self.messages.prefetch([c.message_id for c in claims])  # one per recipient: held
            except DATABASE_UNAVAILABLE:
                pass  # each delivery loads its message itself
            await self._route(claims)
            self._wake.set()

    async def _route(self, claims: list[Claim]) -> None:
        by_domain: dict[str, list[Claim]] = defaultdict(list)
        for claim in claims:
            by_domain[claim.domain].append(claim)
        domains = list(by_domain)
        routes = await asyncio.gather(*(self.resolver.route(d) for d in domains))
        rules = self.shaping()
        failed: list[Outcome] = []
        later: list[tuple[Claim, float]] = []
        now = time.monotonic()
        for domain, route in zip(domains, routes):
            if isinstance(route, RouteFailure):
                failed += [self._outcome(c, route.reply) for c in by_domain[domain]]
                for claim in by_domain[domain]:
                    self.messages.release(claim.message_id)
                continue
            shape = rules.shape_for(domain, route.host_names)
            # The horizon: a quarter lease, well inside the half lease after which held recipients are handed
            # back anyway (_hand_back). Half of what the node holds at most: the rest stays for the sites behind.
            later += self.scheduler.add(shape, route, by_domain[domain], now, horizon_s=self.lease_s / 4,
                                        max_held=self.settings.max_active_recipients // 2)
        if later:
            self._spawn(self._postpone(later, now))
        if failed:
            await self.writer.record(failed)

    async def _postpone(self, later: list[tuple[Claim, float]], now: float) -> None:
        """Put recipients their site cannot send soon back in the queue until their expected turn."""
        for claim, _ in later:
            self.messages.release(claim.message_id)
        wall = _utcnow()
        try:
            await self.store.postpone(
                self.claimer.owner, [(c.recipient_id, wall + timedelta(seconds=turn - now)) for c, turn in later], wall
            )
        except DATABASE_UNAVAILABLE:
            return  # the leases expire and are reclaimed
        POSTPONED.inc(len(later))

    # -- dispatching --------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            await self._hand_back(now)
            for dispatch in self.scheduler.next_dispatches(now):
                self._spawn(self._deliver(dispatch))
            wakeup = self.scheduler.next_wakeup(now)
            timeout = 1.0 if wakeup is None else min(1.0, max(0.0, wakeup - now))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _hand_back(self, now: float) -> None:
        """Dead sites' recipients become deferrals (an attempt that failed); stale ones are released."""
        handed = self.scheduler.take_unservable(now, max_hold_s=self.lease_s / 2)
        if not handed:
            return
        for h in handed:
            self.messages.release(h.claim.message_id)
        stale = [h.claim.recipient_id for h in handed if h.not_before is None]
        outcomes = []
        for h in handed:
            if h.not_before is None:
                continue
            reply = unreachable_site_reply(h.error)
            outcome = self._outcome(h.claim, reply)
            if outcome.state is RecipientState.DEFERRED:
                not_before = _utcnow() + timedelta(seconds=max(0.0, h.not_before - now))
                outcome = Outcome(h.claim.recipient_id, outcome.state, reply, max(outcome.next_attempt_at, not_before))
            outcomes.append(outcome)
        if outcomes:
            self._spawn(self.writer.record(outcomes))
        if stale:
            self._spawn(self._release(stale))
        self._room.set()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _release(self, recipient_ids: list[int]) -> None:
        try:
            await self.store.release(self.claimer.owner, recipient_ids, _utcnow())
        except DATABASE_UNAVAILABLE:
            pass  # the leases expire and are reclaimed

    # -- the cluster (mtad.cluster.membership.ClusterAware) -----------------------------------------------
    def live_nodes_changed(self, live: int) -> None:
        # Message rates alone need no database while this node is alone; connection rates are split evenly.
        self.scheduler.shared_rates = live > 1 and self.rate_tokens is not None
        self.pool.rate_share = 1.0 / max(1, live)

    async def _take_rate_tokens(self) -> None:
        """Feed rate-limited sites from the cluster's token buckets while other nodes share them."""
        while True:
            wanted = self.scheduler.tokens_wanted(time.monotonic())
            if wanted:
                try:
                    granted = await asyncio.gather(*(self.rate_tokens(*want) for want in wanted))
                except DATABASE_UNAVAILABLE:
                    granted = []
                for (site, *_), tokens in zip(wanted, granted):
                    self.scheduler.grant(site, tokens)
                if any(granted):
                    self._wake.set()
            await asyncio.sleep(_RATE_TOKEN_INTERVAL_S)

    async def slots_wanted(self, sites: list[str], live: int) -> None:
        shares = {}
        for site in sites:
            shape = self.scheduler.shape_of(site)
            if shape is not None:
                shares[site] = shape.limits.connection_limit // max(1, live)
        await self.pool.share_with_other_nodes(shares)

    def throttled_elsewhere(self, site: str, error: str | None) -> None:
        held = self.scheduler.throttled_elsewhere(site, time.monotonic(), error)
        log_event(log, "delivery.throttled_elsewhere", site=site, error=error, held_here=held)
        self._wake.set()

    def suppressed(self, payload: str) -> None:
        """NOTIFY mtad_suppressed: an unsubscribe or a hard bounce just now, maybe for a copy we hold."""
        self.recent_suppressions.add(payload, time.monotonic())

    async def _deliver(self, dispatch: Dispatch) -> None:
        try:
            await self._attempt(dispatch)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leak the site's window slot; the leases expire and are reclaimed
            log.exception("delivery failed unexpectedly")
            self.scheduler.abandon(dispatch)
            self.messages.release(dispatch.message_id, len(dispatch.claims))
            self._room.set()
            self._wake.set()

    async def _drop_suppressed(self, dispatch: Dispatch) -> tuple[Dispatch, int]:
        """Take out recipients who left after we leased them (unsubscribe, hard bounce): no attempt, ever."""
        now = time.monotonic()
        dropped = [c for c in dispatch.claims if self.recent_suppressions.blocks(c, now)]
        if not dropped:
            return dispatch, 0
        SUPPRESSED_BEFORE_ATTEMPT.inc(len(dropped))
        await self.writer.record([Outcome(c.recipient_id, RecipientState.CANCELLED, None) for c in dropped])
        return dataclasses.replace(dispatch, claims=tuple(c for c in dispatch.claims if c not in dropped)), len(dropped)

    async def _attempt(self, dispatch: Dispatch) -> None:
        started = time.monotonic()
        dispatch, dropped = await self._drop_suppressed(dispatch)
        if not dispatch.claims:
            self.scheduler.finish(dispatch, Feedback.RECIPIENT_ONLY, time.monotonic(), held=dropped)
            self.messages.release(dispatch.message_id, dropped)
            self._room.set()
            self._wake.set()
            return
        try:
            message = await self.messages.get(dispatch.message_id)
        except DATABASE_UNAVAILABLE:
            self.scheduler.put_back(dispatch, Feedback.RECIPIENT_ONLY, time.monotonic(), dropped=dropped)
            self.messages.release(dispatch.message_id, dropped)
            self._wake.set()
            return
        if message is None:
            raise LookupError(f"message {dispatch.message_id} of leased recipients is gone")
        copy = self.copies.make(message, dispatch.claims[0])
        by_id = {c.recipient_id: c for c in dispatch.claims}
        for _ in range(2):  # a pooled connection found dead at its RSET probe is replaced once
            try:
                conn = await self.pool.acquire(dispatch.shape, dispatch.route)
            except NoConnectionSlot:
                CLUSTER_SLOT_WAITS.labels(dispatch.shape.provider or "other").inc()
                self.scheduler.put_back(dispatch, Feedback.NO_SLOT, time.monotonic(), dropped=dropped)
                self.messages.release(dispatch.message_id, dropped)
                self._wake.set()
                return
            except SessionFailure as failure:
                feedback = Feedback.THROTTLED if failure.throttled else Feedback.SESSION_FAILED
                SESSION_FAILURES.labels(dispatch.shape.provider or "other", feedback.value).inc()
                self.scheduler.put_back(dispatch, feedback, time.monotonic(), str(failure), dropped=dropped)
                self.messages.release(dispatch.message_id, dropped)
                log_event(log, "delivery.session_failed", logging.WARNING, site=dispatch.site, error=str(failure))
                if failure.throttled:
                    self.announce_throttle(dispatch.site, str(failure))
                self._wake.set()
                return
            smtp_started = time.monotonic()  # the transaction alone: opening connections has limits of its own
            result = await run_transaction(
                conn,
                copy.mail_from,
                [(c.recipient_id, c.address) for c in dispatch.claims],
                copy.data,
                smtputf8=message.smtputf8,
                timeouts=self.timeouts,
                throttle_patterns=self.shaping().throttle_patterns,
                # Asked again right before MAIL FROM: loading, signing and connecting took time, and an
                # unsubscribe may have arrived meanwhile.
                still_wanted=lambda rid: not self.recent_suppressions.blocks(by_id[rid], time.monotonic()),
            )
            if not result.stale:
                break
            await self.pool.release(dispatch.shape, conn, reusable=False, max_open=0)
        else:
            self.scheduler.put_back(dispatch, Feedback.RECIPIENT_ONLY, time.monotonic(), dropped=dropped)
            self.messages.release(dispatch.message_id, dropped)
            self._wake.set()
            return
        smtp_took_s = time.monotonic() - smtp_started
        SUPPRESSED_BEFORE_ATTEMPT.inc(len(result.withdrawn))
        max_open = self.scheduler.concurrency_of(dispatch.site, time.monotonic())
        await self.pool.release(dispatch.shape, conn, reusable=result.reusable, max_open=max_open)
        duration_ms = int((time.monotonic() - started) * 1000)
        outcomes = [
            Outcome(c.recipient_id, RecipientState.CANCELLED, None)
            if c.recipient_id in result.withdrawn
            else self._outcome(c, result.replies[c.recipient_id], dispatch, conn.mx.name, conn.tls_version, duration_ms)
            for c in dispatch.claims
        ]
        await self.writer.record(outcomes)
        self._count(dispatch, outcomes)
        if result.throttled:
            feedback, error = Feedback.THROTTLED, f"{result.throttled.code} {result.throttled.text}"
            self.announce_throttle(dispatch.site, error)
        elif result.connection_lost:
            lost = result.lost_reply
            feedback, error = Feedback.SESSION_FAILED, f"{lost.code} {lost.enhanced or ''} {lost.text}" if lost else "connection lost"
        elif any(200 <= r.code < 300 for r in result.replies.values()):
            feedback, error = Feedback.DELIVERED, None
        else:
            feedback, error = Feedback.RECIPIENT_ONLY, None
        self.scheduler.finish(
            dispatch, feedback, time.monotonic(), error, held=len(dispatch.claims) + dropped, took_s=smtp_took_s
        )
        self.messages.release(dispatch.message_id, len(dispatch.claims) + dropped)
        self._room.set()
        self._wake.set()

    def _count(self, dispatch: Dispatch, outcomes: list[Outcome]) -> None:
        provider = dispatch.shape.provider or "other"
        wall = _utcnow()
        for claim, outcome in zip(dispatch.claims, outcomes):
            if outcome.state is RecipientState.CANCELLED:
                continue  # withdrawn before MAIL FROM: not an attempt
            ATTEMPTS.labels(provider, outcome.state.value).inc()
            if outcome.state is RecipientState.BOUNCED:
                BOUNCES.labels("smtp", outcome.category or "other").inc()
            elif outcome.state is RecipientState.DELIVERED:
                DELIVERY_LATENCY.observe((wall - claim.queued_at).total_seconds())

    def _outcome(self, claim, reply, dispatch=None, mx_host=None, tls_version=None, duration_ms=None) -> Outcome:
        state, retry_at = next_state(
            claim,
            reply,
            _utcnow(),
            minimal_backoff_s=self.settings.minimal_backoff_time,
            maximal_backoff_s=self.settings.maximal_backoff_time,
            queue_lifetime_s=self.settings.maximal_queue_lifetime,
            jitter_fraction=self.settings.retry_jitter,
            random_unit=random.random(),
        )
        verdict = None if state is RecipientState.DELIVERED else classify_reply(
            self.bounce_rules, reply.code, reply.enhanced, reply.text
        )
        return Outcome(
            claim.recipient_id,
            state,
            reply,
            retry_at,
            site=dispatch.site if dispatch else None,
            mx_host=mx_host,
            tls_version=tls_version,
            duration_ms=duration_ms,
            category=verdict.category if verdict else None,
            hard=bool(verdict and verdict.hard and state is RecipientState.BOUNCED),
        )

    async def keep_leases_if_due(self) -> None:
        """Renew the leases of every recipient held or in flight once a third of the lease has passed since
        the last renewal. Also called right before this node reclaims expired leases, so that after a
        database outage it renews its own before it could reclaim them."""
        if time.monotonic() - self._leases_renewed_at < self.lease_s / 3:
            return
        ids = self.scheduler.held_recipient_ids()
        for start in range(0, len(ids), 5000):
            await self.store.extend_leases(self.claimer.owner, ids[start : start + 5000], _utcnow(), self.lease_s)
        self._leases_renewed_at = time.monotonic()

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.keep_leases_if_due()
            except DATABASE_UNAVAILABLE:
                pass  # due still: tried again in a second
            except Exception:  # noqa: BLE001 - a bug here must not end the renewals for good
                log.exception("renewing leases failed")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval)
            try:
                await self._housekeeping_round()
            except Exception:  # noqa: BLE001 - one bad round must not end idle closing and status for good
                log.exception("delivery housekeeping round failed")

    async def _housekeeping_round(self) -> None:
        now = time.monotonic()
        await self.pool.close_idle(now)
        if self.slots is not None:
            CLUSTER_SLOTS_HELD.set(len(self.slots.held))
        await self._publish_site_status(now)
        self.scheduler.forget_quiet_sites(now)

    async def _publish_site_status(self, now: float) -> None:
        wall = _utcnow()
        states = [
            dataclasses.replace(
                state, dead_until=wall + timedelta(seconds=state.dead_until - now) if state.dead_until else None
            )
            for state in self.scheduler.site_states(now)
        ]
        for gauge in (SITE_WINDOW, SITE_IN_FLIGHT, SITE_PENDING, SITE_BACKOFF):
            gauge.clear()  # sites this node no longer holds disappear from /metrics
        for state in states:
            labels = (state.provider or "other", state.site if state.provider else "other")
            # Sites of no configured provider add up under "other": MX host names are no label values.
            SITE_WINDOW.labels(*labels).inc(state.concurrency)
            SITE_IN_FLIGHT.labels(*labels).inc(state.in_flight)
            SITE_PENDING.labels(*labels).inc(state.pending)
            for health in ("healthy", "backoff", "dead"):
                SITE_BACKOFF.labels(*labels, health).inc(1 if state.health == health else 0)
        try:
            await self.store.publish_site_status(self.claimer.owner, states, wall)
        except DATABASE_UNAVAILABLE:
            pass  # only a report; the next round publishes again

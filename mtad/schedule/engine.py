"""The scheduler as a pure engine (OpenSMTPD's scheduler backend, h11's next_event): no await, `now` passed in.

In:  `add(shape, route, claims, now, horizon_s)` leased recipients, grouped by destination site; what a
     site cannot send within the horizon comes back out, each with the time its turn is expected;
     `finish(dispatch, feedback, now)` after each delivery attempt.
Out: `next_dispatches(now)`: transactions that may start now: one message to one site, its recipients at
     that site grouped up to `max_recipients_per_transaction`; `next_wakeup(now)`: when to ask again.
Invariants:
- never more dispatches in flight to a site than its window allows, never faster than its message rate;
- sites take turns (round robin), so one huge domain cannot starve the others;
- everything held is bounded by what the runner claims (`held` recipients), so memory stays flat however
  large the queue in PostgreSQL grows;
- a site holds no more than it can send within the horizon: a backlog beyond that would fill the held set
  and keep the head of the queue, and every other site's mail (a password reset to a small domain behind a
  campaign to a throttled provider, or to a slow MX that takes seconds per message) would wait for it. What a
  site can send is the smaller of its message rate, if it has one, and what its connections manage:
  `connection_limit` transactions at a time, each as long as its recent ones (`_Site.transaction_s`, a moving
  average). The rest is put back in the queue in the order the site will get to it, each recipient once
  (`_Site.postponed_until` continues where the last batch ended). Before a site without a message rate has
  finished a transaction its speed is unknown: it holds at most `max_held`, and what is beyond comes back
  after one horizon, to be planned at the speed it showed by then. After that, no cap of `max_held` on such a
  site: a deep queue to one fast relay (every domain routed through a smarthost) would have much of it put
  back, one more write each.
Cluster: with `shared_rates` on (more than one live node) a rate-limited site also needs a token of the
cluster's bucket for it: `tokens_wanted(now)` says which sites need how many, the runner takes them from
PostgreSQL and `grant`s them. A dispatch that found no free cluster-wide connection slot caps its site at
what is in flight for `slot_retry_s`; a throttle another node met backs this node off too.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from mtad.model import Claim, Route
from mtad.policy.rate import TokenBucket
from mtad.policy.shaping import SiteShape
from mtad.policy.window import DestinationWindow, SiteHealth


class Feedback(Enum):
    DELIVERED = "delivered"  # a session worked: positive feedback
    RECIPIENT_ONLY = "recipient_only"  # the session worked but said nothing about capacity
    SESSION_FAILED = "session_failed"  # connect / greeting / TLS failure: negative feedback
    THROTTLED = "throttled"  # 421 or a rate-limit reply: backoff
    NO_SLOT = "no_slot"  # every cluster-wide connection slot of the site is held: wait, no judgement


@dataclass(frozen=True)
class Dispatch:
    id: int
    site: str
    shape: SiteShape
    route: Route
    message_id: int
    claims: tuple[Claim, ...]
    held_since: float = 0.0  # when the oldest of its recipients came to this scheduler (their lease runs)


@dataclass(frozen=True)
class HandedBack:
    """A recipient the scheduler gives back: `not_before` (monotonic) and `error` are set for a dead site."""

    claim: Claim
    not_before: float | None
    error: str | None


@dataclass
class _Waiting:
    claim: Claim
    route: Route
    since: float


@dataclass
class _Site:
    shape: SiteShape
    window: DestinationWindow
    message_rate: TokenBucket | None
    pending: deque[_Waiting] = field(default_factory=deque)
    in_flight: int = 0
    slot_cap: int | None = None  # no free connection slot: no more in flight than this until slot_cap_until
    slot_cap_until: float = 0.0
    cluster_tokens: int = 0  # granted from the cluster's bucket of this site, not yet used
    postponed_until: float = 0.0  # the expected turn of the last recipient put back for later
    transaction_s: float | None = None  # moving average of how long its transactions take, once one finished

    def note_transaction(self, took_s: float) -> None:
        """A moving average of transaction times; one stall counts for at most 4 times the average so far, so
        that a single hiccup does not spread the site's next backlog far into the future."""
        if self.transaction_s is None:
            self.transaction_s = took_s
        else:
            self.transaction_s = 0.8 * self.transaction_s + 0.2 * min(took_s, 4 * self.transaction_s)

    def concurrency(self, now: float) -> int:
        allowed = self.window.concurrency(now)
        if self.slot_cap is not None:
            if now < self.slot_cap_until:
                return min(allowed, self.slot_cap)
            self.slot_cap = None
        return allowed


@dataclass(frozen=True)
class SiteState:
    site: str
    provider: str | None
    health: str
    concurrency: int
    in_flight: int
    pending: int
    rate_scale: float
    dead_until: float | None
    last_error: str | None


class Scheduler:
    def __init__(
        self, one_recipient_per_transaction: Callable[[Claim], bool] = lambda claim: False, slot_retry_s: float = 0.5
    ) -> None:
        """`one_recipient_per_transaction`: copies that differ per recipient (List-Unsubscribe, VERP)."""
        self._one_recipient = one_recipient_per_transaction
        self._slot_retry_s = slot_retry_s
        self.shared_rates = False
        self._sites: dict[str, _Site] = {}
        self._rotation: deque[str] = deque()
        self._ids = itertools.count(1)
        self._in_flight: dict[int, Dispatch] = {}
        self._remote_throttles: dict[str, tuple[float, str]] = {}  # sites not held here yet: (when, error)
        self.held = 0  # recipients pending or in flight

    def add(
        self,
        shape: SiteShape,
        route: Route,
        claims: list[Claim],
        now: float,
        horizon_s: float | None = None,
        max_held: int | None = None,
    ) -> list[tuple[Claim, float]]:
        """Hold `claims` for their site. With a horizon, a site keeps only what it can send within `horizon_s`
        (`_sending_rate`), a rate-limited one, or one whose speed is not known yet, never more than `max_held`;
        the others are returned with the time (like `now`) their turn is expected, for the caller to put back
        in the queue."""
        site = self._site(shape, now)
        later: list[tuple[Claim, float]] = []
        rate = self._sending_rate(site, shape, claims) if horizon_s is not None else None  # recipients/s
        if rate is not None:
            holds = math.ceil(rate * horizon_s)
            if site.message_rate is not None and max_held is not None:
                holds = min(holds, max_held)
        else:  # no horizon, or its speed is not known yet
            holds = max_held if horizon_s is not None else None
        room = len(claims) if holds is None else max(0, holds - len(site.pending) - site.in_flight)
        if len(claims) > room:
            claims, beyond = claims[:room], claims[room:]
            if rate is None:
                later = [(claim, now + horizon_s) for claim in beyond]  # planned again then, at the speed it showed
            else:
                turn = max(site.postponed_until, now + (len(site.pending) + site.in_flight + room) / rate)
                later = [(claim, turn + k / rate) for k, claim in enumerate(beyond)]
                site.postponed_until = turn + len(beyond) / rate
        site.pending.extend(_Waiting(claim, route, now) for claim in claims)
        self.held += len(claims)
        return later

    def _sending_rate(self, site: _Site, shape: SiteShape, claims: list[Claim]) -> float | None:
        """Recipients per second the site takes: the smaller of its message rate and what its connections
        manage; None when it has no message rate and no transaction has finished yet. The site's whole rate,
        also when nodes share it: which node gets how much of it changes from moment to moment, and a recipient
        back too early is only put back again, while one back too late leaves the site idle. Rates count
        transactions; one carries several recipients of a message (this batch's mix)."""
        per_transaction = self._recipients_per_transaction(shape, claims) * site.window.rate_scale
        rates = []
        if site.message_rate is not None:
            rates.append(site.message_rate.rate_per_s * per_transaction)
        if site.transaction_s is not None:
            rates.append(shape.limits.connection_limit * per_transaction / max(site.transaction_s, 0.001))
        return min(rates) if rates else None

    def _recipients_per_transaction(self, shape: SiteShape, claims: list[Claim]) -> float:
        """How many of `claims` one transaction carries on average, grouped as `_take_dispatch` groups them."""
        limit = shape.limits.max_recipients_per_transaction
        transactions, in_this, previous = 0, 0, None
        for claim in claims:
            if claim.message_id != previous or in_this >= limit or self._one_recipient(claim):
                transactions, in_this, previous = transactions + 1, 0, claim.message_id
            in_this += 1
        return len(claims) / transactions if transactions else 1.0

    def _site(self, shape: SiteShape, now: float) -> _Site:
        site = self._sites.get(shape.site)
        if site is None:
            rate = shape.limits.max_message_rate
            # A tenth of a second's worth of burst: smooth pacing without a wake-up per message at high rates.
            bucket = TokenBucket(rate, burst=max(1.0, rate * 0.1)) if rate else None
            site = _Site(shape=shape, window=DestinationWindow(shape.limits), message_rate=bucket)
            self._sites[shape.site] = site
            self._rotation.append(shape.site)
            told = self._remote_throttles.pop(shape.site, None)
            if told is not None and now - told[0] < shape.limits.backoff_for_s:
                site.window.on_throttled(told[0], told[1])  # another node was throttled just before we came
        elif site.shape != shape:  # the shaping file was reloaded
            site.shape = shape
            site.window.limits = shape.limits
        return site

    def next_dispatches(self, now: float) -> list[Dispatch]:
        dispatches: list[Dispatch] = []
        progress = True
        while progress:
            progress = False
            for _ in range(len(self._rotation)):
                name = self._rotation[0]
                self._rotation.rotate(-1)
                site = self._sites[name]
                if not site.pending or site.in_flight >= site.concurrency(now):
                    continue
                if site.message_rate:
                    if self.shared_rates and site.cluster_tokens < 1:
                        continue
                    if not site.message_rate.try_take(now, site.window.rate_scale):
                        continue
                    if self.shared_rates:
                        site.cluster_tokens -= 1
                dispatches.append(self._take_dispatch(name, site))
                progress = True
        return dispatches

    def _take_dispatch(self, name: str, site: _Site) -> Dispatch:
        first = site.pending.popleft()
        claims = [first.claim]
        held_since = first.since
        limit = 1 if self._one_recipient(first.claim) else site.shape.limits.max_recipients_per_transaction
        while (
            site.pending
            and len(claims) < limit
            and site.pending[0].claim.message_id == first.claim.message_id
            and site.pending[0].route == first.route
        ):
            waiting = site.pending.popleft()
            claims.append(waiting.claim)
            held_since = min(held_since, waiting.since)
        site.in_flight += 1
        dispatch = Dispatch(
            next(self._ids), name, site.shape, first.route, first.claim.message_id, tuple(claims), held_since
        )
        self._in_flight[dispatch.id] = dispatch
        return dispatch

    def held_recipient_ids(self) -> list[int]:
        """Every recipient this scheduler holds, waiting or in flight: the leases to keep alive."""
        ids = [w.claim.recipient_id for site in self._sites.values() for w in site.pending]
        ids += [c.recipient_id for dispatch in self._in_flight.values() for c in dispatch.claims]
        return ids

    def finish(
        self,
        dispatch: Dispatch,
        feedback: Feedback,
        now: float,
        error: str | None = None,
        held: int | None = None,
        took_s: float | None = None,
    ) -> None:
        """The attempt is over and its outcomes recorded; its recipients are no longer held.
        `held`: how many the dispatch had when it was taken, if the caller dropped some before the attempt.
        `took_s`: how long the SMTP transaction took on its connection (not opening the connection, which
        `max_connection_rate` paces, nor recording the outcome, which waits out a database outage)."""
        site = self._sites[dispatch.site]
        site.in_flight -= 1
        self._in_flight.pop(dispatch.id, None)
        self.held -= len(dispatch.claims) if held is None else held
        if took_s is not None and feedback in (Feedback.DELIVERED, Feedback.RECIPIENT_ONLY):
            site.note_transaction(took_s)
        if feedback is Feedback.DELIVERED:
            site.window.on_success(now)
        elif feedback is Feedback.SESSION_FAILED:
            site.window.on_session_failure(now, error or "session failed")
        elif feedback is Feedback.THROTTLED:
            site.window.on_throttled(now, error or "throttled")

    def put_back(
        self, dispatch: Dispatch, feedback: Feedback, now: float, error: str | None = None, dropped: int = 0
    ) -> None:
        """The attempt never reached the recipients (no session): they wait again, first in line, counted as
        held since they first came (their lease has been running all along: see `take_unservable`).
        `dropped`: recipients the caller took out of the dispatch (and recorded) before trying."""
        site = self._sites[dispatch.site]
        self.held -= dropped
        site.pending.extendleft(_Waiting(c, dispatch.route, dispatch.held_since) for c in reversed(dispatch.claims))
        self._in_flight.pop(dispatch.id, None)
        site.in_flight -= 1  # still held: `held` does not change
        if feedback is Feedback.SESSION_FAILED:
            site.window.on_session_failure(now, error or "session failed")
        elif feedback is Feedback.THROTTLED:
            site.window.on_throttled(now, error or "throttled")
        elif feedback is Feedback.NO_SLOT:
            site.slot_cap = site.in_flight
            site.slot_cap_until = now + self._slot_retry_s

    def throttled_elsewhere(self, site_name: str, now: float, error: str | None) -> bool:
        """Another node was throttled by this site: back off as if we had been. False if we do not hold it
        (yet): then it is remembered, and the site starts backed off if it comes within its backoff time."""
        site = self._sites.get(site_name)
        if site is None:
            self._remote_throttles[site_name] = (now, error or "throttled (another node)")
            return False
        site.window.on_throttled(now, error or "throttled (another node)")
        return True

    def tokens_wanted(self, now: float, ahead_s: float = 0.2) -> list[tuple[str, float, float, int]]:
        """(site, rate per second, burst, tokens) to take from the cluster's buckets: sites that could
        dispatch now but for a token, asking for `ahead_s` worth at the (backed-off) rate."""
        if not self.shared_rates:
            return []
        wanted = []
        for name, site in self._sites.items():
            if not site.message_rate or site.cluster_tokens >= 1 or not site.pending:
                continue
            if site.in_flight >= site.concurrency(now):
                continue
            rate = site.message_rate.rate_per_s * site.window.rate_scale
            want = min(len(site.pending), max(1, int(rate * ahead_s)))
            wanted.append((name, rate, site.message_rate.burst, want))
        return wanted

    def grant(self, site_name: str, tokens: int) -> None:
        site = self._sites.get(site_name)
        if site is not None:
            site.cluster_tokens += tokens

    def abandon(self, dispatch: Dispatch) -> None:
        """The attempt broke in an unexpected way: free its slot and forget its recipients (their leases
        expire and the queue hands them out again)."""
        self._sites[dispatch.site].in_flight -= 1
        self._in_flight.pop(dispatch.id, None)
        self.held -= len(dispatch.claims)

    def take_unservable(self, now: float, max_hold_s: float) -> list[HandedBack]:
        """Recipients to hand back to the queue: those of dead sites (due again when the site may be probed)
        and those held longer than `max_hold_s` (before their lease runs out and another node takes them)."""
        handed_back: list[HandedBack] = []
        for site in self._sites.values():
            if site.pending and site.window.concurrency(now) == 0:  # dead, not merely short of slots
                window = site.window
                handed_back += [HandedBack(w.claim, window.dead_until, window.last_error) for w in site.pending]
                site.pending.clear()
                continue
            while site.pending and now - site.pending[0].since > max_hold_s:
                handed_back.append(HandedBack(site.pending.popleft().claim, None, None))
        self.held -= len(handed_back)
        return handed_back

    def shape_of(self, site: str) -> SiteShape | None:
        known = self._sites.get(site)
        return known.shape if known else None

    def concurrency_of(self, site: str, now: float) -> int:
        known = self._sites.get(site)
        return known.concurrency(now) if known else 0

    def next_wakeup(self, now: float) -> float | None:
        times = []
        for site in self._sites.values():
            changes_at = site.window.wakeup_at()
            if changes_at is not None:
                times.append(changes_at)
            if site.slot_cap is not None and site.pending:
                times.append(site.slot_cap_until)
            if site.pending and site.message_rate and site.in_flight < site.concurrency(now):
                times.append(now + site.message_rate.seconds_until_token(now, site.window.rate_scale))
        return min(times) if times else None

    def forget_quiet_sites(self, now: float, remember_throttles_s: float = 3600.0) -> None:
        """Drop healthy sites with nothing held, so memory follows the active destinations only."""
        for name in [n for n, (at, _) in self._remote_throttles.items() if now - at > remember_throttles_s]:
            del self._remote_throttles[name]
        for name in [
            name
            for name, site in self._sites.items()
            if not site.pending and not site.in_flight and site.window.health is SiteHealth.HEALTHY
        ]:
            del self._sites[name]
            self._rotation.remove(name)

    def site_states(self, now: float) -> list[SiteState]:
        return [
            SiteState(
                site=name,
                provider=site.shape.provider,
                health=site.window.health.value,
                concurrency=site.concurrency(now),
                in_flight=site.in_flight,
                pending=len(site.pending),
                rate_scale=site.window.rate_scale,
                dead_until=site.window.dead_until if site.window.health is SiteHealth.DEAD else None,
                last_error=site.window.last_error,
            )
            for name, site in self._sites.items()
        ]

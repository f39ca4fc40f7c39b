"""Typed values that flow between the stages, and the recipient state table.

A message moves one way: ingest builds a `Submission`, the queue stores it and hands out `Claim`s, delivery
answers with a `Reply` per recipient. These are frozen so no stage can change what another stage holds.

The recipient state machine lives here as one table (`TRANSITIONS`, after h11's `_state.py`); the SQL schema
mirrors the state names in a CHECK constraint and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class RecipientState(StrEnum):
    QUEUED = "queued"  # waiting for its first attempt
    ACTIVE = "active"  # leased by one node that is attempting delivery
    DEFERRED = "deferred"  # a temporary failure; due again at next_attempt_at
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # permanent failure
    EXPIRED = "expired"  # deferred for longer than the queue lifetime
    SUPPRESSED = "suppressed"  # never attempted: the address is on a suppression list
    CANCELLED = "cancelled"  # removed by an operator or an unsubscribe


S = RecipientState
TRANSITIONS: dict[RecipientState, frozenset[RecipientState]] = {
    S.QUEUED: frozenset({S.ACTIVE, S.SUPPRESSED, S.CANCELLED}),
    # ACTIVE -> QUEUED is a release (lease given back without an attempt) or a reclaimed lease.
    # ACTIVE -> CANCELLED: the recipient unsubscribed while its copy was leased, before the attempt.
    S.ACTIVE: frozenset({S.DELIVERED, S.DEFERRED, S.BOUNCED, S.EXPIRED, S.QUEUED, S.CANCELLED}),
    S.DEFERRED: frozenset({S.ACTIVE, S.EXPIRED, S.SUPPRESSED, S.CANCELLED}),
    S.DELIVERED: frozenset(),
    S.BOUNCED: frozenset(),
    S.EXPIRED: frozenset(),
    S.SUPPRESSED: frozenset(),
    S.CANCELLED: frozenset(),
}
DUE_STATES = (S.QUEUED, S.DEFERRED)
TERMINAL_STATES = frozenset(state for state, targets in TRANSITIONS.items() if not targets)


def can_transition(current: RecipientState, target: RecipientState) -> bool:
    return target in TRANSITIONS[current]


class MessageClass(StrEnum):
    MARKETING = "marketing"  # promotional: gets List-Unsubscribe, honours unsubscribes
    TRANSACTIONAL = "transactional"  # account and maintenance mail: exempt from unsubscribes, never promotional


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    domains: frozenset[str]
    default_class: MessageClass = MessageClass.MARKETING


@dataclass(frozen=True)
class EnvelopeRecipient:
    address: str  # as the client wrote it, domain normalised (lower case, Unicode form kept for SMTPUTF8)
    domain: str  # ASCII (IDNA A-label) form, used for routing and grouping


@dataclass(frozen=True)
class Submission:
    queue_id: str
    tenant_id: int
    mail_from: str
    recipients: tuple[EnvelopeRecipient, ...]
    body: bytes  # CRLF line endings, headers added by mtad included
    client_ip: str  # masked (last octet / beyond /48 zeroed)
    received_at: datetime
    smtputf8: bool = False
    message_class: MessageClass = MessageClass.MARKETING
    list_id: str = ""  # the tenant's list, scoping unsubscribes; "" when none was named


@dataclass(frozen=True)
class Claim:
    """One leased recipient, with what delivery needs to know about its message."""

    recipient_id: int
    message_id: int
    queue_id: str
    tenant_id: int
    mail_from: str
    address: str
    domain: str
    attempts: int
    queued_at: datetime
    lease_expires_at: datetime
    message_class: MessageClass = MessageClass.MARKETING
    list_id: str = ""


@dataclass(frozen=True)
class Reply:
    """An SMTP reply as recorded: code, RFC 3463 enhanced code when present, text."""

    code: int
    enhanced: str | None
    text: str


@dataclass(frozen=True)
class MxHost:
    name: str  # the MX host name: TLS certificates are checked against it, never against the IP
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """Where a destination's mail goes: its MX hosts in preference order and the SMTP port."""

    hosts: tuple[MxHost, ...]
    port: int

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(host.name for host in self.hosts)


@dataclass(frozen=True)
class RouteFailure:
    """No route: permanent (NXDOMAIN, null MX: bounce now) or temporary (SERVFAIL, timeout: defer)."""

    permanent: bool
    reply: Reply

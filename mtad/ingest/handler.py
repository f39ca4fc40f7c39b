"""The submission hooks: translate aiosmtpd's calls, ask `policy`, await the store, return the reply.

AUTH (PLAIN, LOGIN) is done here rather than by aiosmtpd's synchronous authenticator because checking a
tenant needs the database and argon2, both awaited. A failed login is rate-limited per client address.
The message and all its recipients are stored in one transaction before the 250 (shared with the messages
other sessions submitted at the same moment: `mtad.queue.group_commit`); when the database cannot be reached
the client gets 451 4.3.0 and keeps the message.
"""

from __future__ import annotations

import binascii
import ipaddress
import logging
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from aiosmtpd.smtp import MISSING

from mtad.config import SubmissionSettings
from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.ingest.credentials import CredentialVerifier
from mtad.ingest.protocol import SubmissionEnvelope, SubmissionSession, SubmissionSMTP
from mtad.ingest.random_bits import RandomBits
from mtad.model import EnvelopeRecipient, Submission, Tenant
from mtad.observe.logs import log_event
from mtad.observe.metrics import AUTH_FAILURES, SUBMISSIONS
from mtad.policy.admission import (
    Refusal,
    admit_content,
    admit_recipient,
    admit_sender,
    from_header_domains,
)
from mtad.policy.connection_limits import over_queue_limit
from mtad.policy.log_privacy import LogPrivacy
from mtad.policy.login_throttle import LoginThrottle
from mtad.policy.message_class import classify_message, strip_owned_headers
from mtad.policy.message_text import from_addresses, header_fields, normalize_line_endings, split_message, trace_headers
from mtad.policy.queue_id import make_queue_id
from mtad.queue.group_commit import GroupCommit

log = logging.getLogger("mtad.ingest")

QUEUE_UNAVAILABLE = "451 4.3.0 Queue temporarily unavailable; message not accepted, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down; try again later"
_QUEUE_ID_BITS = RandomBits()


@dataclass(frozen=True)
class _Login:
    login: str
    password: str


class SubmissionHandler:
    def __init__(
        self,
        *,
        settings: SubmissionSettings,
        hostname: str,
        store: GroupCommit,
        verifier: CredentialVerifier,
        wall_clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] = lambda: None,
        privacy: LogPrivacy = LogPrivacy(),
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self.privacy = privacy
        self._queue_depth = queue_depth
        self.hostname = hostname
        self._on_queued = on_queued
        self.store = store
        self.verifier = verifier
        self._clock = wall_clock
        self.draining = False
        self.apply_settings(settings)

    def apply_settings(self, settings: SubmissionSettings) -> None:
        """Take new limits (SIGHUP); open connections keep working and see them from their next command."""
        self.settings = settings
        self._trusted = [(ipaddress.ip_network(t.network, strict=False), t.tenant) for t in settings.trusted_networks]
        self.throttle = LoginThrottle(settings.max_failed_logins, settings.failed_login_window)

    # -- AUTH ---------------------------------------------------------------------------------------
    async def handle_AUTH(self, server: SubmissionSMTP, session: SubmissionSession, envelope, args: list[str]):
        if not session.tls:
            return "538 5.7.11 Encryption required for requested authentication mechanism"
        client = _peer_ip(session)
        if self.throttle.is_blocked(client, self._clock()):
            log_event(log, "auth.throttled", client=self.privacy.client_ip(client))
            return "454 4.7.0 Too many failed logins; try again later"
        login = await _read_credentials(server, args)
        if not isinstance(login, _Login):
            return login  # a reply for a malformed exchange, or None when aiosmtpd already answered
        try:
            tenant = await self.verifier.verify(login.login, login.password)
        except DATABASE_UNAVAILABLE:
            return "454 4.7.0 Temporary authentication failure; try again later"
        if tenant is None:
            AUTH_FAILURES.inc()
            self.throttle.record_failure(client, self._clock())
            log_event(log, "auth.failed", client=self.privacy.client_ip(client))
            return "535 5.7.8 Authentication credentials invalid"
        self.throttle.record_success(client)
        session.authenticated = True
        session.tenant = tenant
        log_event(log, "auth.ok", tenant=tenant.name, client=self.privacy.client_ip(client))
        return "235 2.7.0 Authentication successful"

    # -- EHLO ---------------------------------------------------------------------------------------
    async def handle_EHLO(self, server, session: SubmissionSession, envelope, hostname: str, responses: list[str]):
        """aiosmtpd's keywords, PIPELINING, which SubmissionSMTP implements (RFC 2920), and ENHANCEDSTATUSCODES
        (RFC 2034: every reply but the greeting and HELO/EHLO's carries one, mtad.policy.replies)."""
        session.host_name = hostname  # with this hook aiosmtpd leaves that to us
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    # -- MAIL / RCPT / DATA -------------------------------------------------------------------------
    async def handle_MAIL(self, server, session: SubmissionSession, envelope: SubmissionEnvelope, address, options):
        if self.draining:
            return SHUTTING_DOWN
        full = over_queue_limit(self._queue_depth(), self.settings.max_queue_recipients)
        if full is not None:
            return full
        try:
            tenant = await self._tenant_of(session)
        except DATABASE_UNAVAILABLE:
            return QUEUE_UNAVAILABLE
        decision = admit_sender(tenant, address, smtputf8=envelope.smtp_utf8)
        if isinstance(decision, Refusal):
            SUBMISSIONS.labels(tenant.name if tenant else "none", "refused").inc()
            return decision.reply
        envelope.mail_from = decision.address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server, session: SubmissionSession, envelope: SubmissionEnvelope, address, options):
        decision = admit_recipient(
            session.tenant,
            address,
            smtputf8=envelope.smtp_utf8,
            accepted_so_far=len(envelope.recipients),
            max_recipients=self.settings.max_recipients,
        )
        if isinstance(decision, Refusal):
            return decision.reply
        if decision.address not in envelope.rcpt_tos:  # the same recipient twice is stored once
            envelope.rcpt_tos.append(decision.address)
            envelope.rcpt_options.extend(options)
            envelope.recipients.append(EnvelopeRecipient(decision.address, decision.ascii_domain))
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server, session: SubmissionSession, envelope: SubmissionEnvelope):
        content = normalize_line_endings(envelope.original_content or b"")
        header_block, body = split_message(content)
        fields = header_fields(header_block)
        refusal = admit_content(session.tenant, from_header_domains(from_addresses(fields)))
        kind = classify_message(fields, session.tenant.default_class) if refusal is None else refusal
        if isinstance(kind, Refusal):
            SUBMISSIONS.labels(session.tenant.name if session.tenant else "none", "refused").inc()
            return kind.reply
        content = strip_owned_headers(header_block) + body
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        queue_id = make_queue_id(int(now.timestamp() * 1000), _QUEUE_ID_BITS.next32())
        trace = trace_headers(
            fields,
            queue_id=queue_id,
            hostname=self.hostname,
            helo=session.host_name,
            protocol=_protocol_name(session, envelope),
            now=now,
        )
        submission = Submission(
            queue_id=queue_id,
            tenant_id=session.tenant.id,
            mail_from=envelope.mail_from,
            recipients=tuple(envelope.recipients),
            body=trace + content,
            client_ip=self.privacy.client_ip(_peer_ip(session)),
            received_at=now,
            smtputf8=envelope.smtp_utf8,
            message_class=kind.message_class,
            list_id=kind.list_id,
        )
        try:
            suppressed = await self.store.store(submission)
        except DATABASE_UNAVAILABLE as exc:
            log_event(log, "submission.store_failed", tenant=session.tenant.name, error=type(exc).__name__)
            SUBMISSIONS.labels(session.tenant.name, "failed").inc()
            return QUEUE_UNAVAILABLE
        self._on_queued()
        SUBMISSIONS.labels(session.tenant.name, "accepted").inc()
        log_event(
            log,
            "submission.queued",
            queue_id=queue_id,
            tenant=session.tenant.name,
            recipients=len(submission.recipients),
            suppressed=len(suppressed),
            message_class=kind.message_class.value,
            size=len(submission.body),
            client=submission.client_ip,
        )
        if suppressed:
            # Accepted, stored as suppressed, never attempted: the class that decides whether an unsubscribe
            # applies is only known now, after DATA, so RCPT could not refuse them.
            return (
                f"250 2.0.0 Ok: queued as {queue_id}; {len(suppressed)} of {len(submission.recipients)} "
                f"recipients suppressed ({', '.join(sorted(set(suppressed.values())))})"
            )
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("submission session failed")
        return "451 4.3.0 Local error in processing"

    async def _tenant_of(self, session: SubmissionSession) -> Tenant | None:
        """The authenticated tenant, or the tenant an explicitly trusted network submits as."""
        if session.tenant is None and not session.trusted_lookup_done and self._trusted:
            session.trusted_lookup_done = True
            peer = _peer_ip(session)
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                return None
            name = next((tenant for network, tenant in self._trusted if address in network), None)
            if name is not None:
                session.tenant = await self.verifier.tenant(name)
        return session.tenant


async def _read_credentials(server: SubmissionSMTP, args: list[str]) -> _Login | str | None:
    """Run the PLAIN (RFC 4616) or LOGIN exchange; a reply string or None when it went wrong."""
    mechanism = args[0].upper()
    if mechanism == "PLAIN":
        blob = _b64(args[1]) if len(args) > 1 else await server.challenge_auth("")
        if blob is MISSING:
            return None
        if blob is None or blob.count(b"\0") != 2:
            return "501 5.5.2 Cannot decode AUTH PLAIN response"
        authzid, authcid, password = blob.split(b"\0")
        if authzid and authzid != authcid:
            return "535 5.7.8 Authentication credentials invalid"  # no acting on behalf of another tenant
        return _decoded(authcid, password)
    if mechanism == "LOGIN":
        user = _b64(args[1]) if len(args) > 1 else await server.challenge_auth("Username:")
        if user is MISSING:
            return None
        if user is None:
            return "501 5.5.2 Cannot decode AUTH LOGIN response"
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return None
        return _decoded(user, password)
    return "504 5.5.4 Unrecognized authentication type"


def _b64(text: str) -> bytes | None:
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decoded(login: bytes, password: bytes) -> _Login | str:
    try:
        return _Login(login.decode("utf-8"), password.decode("utf-8"))
    except UnicodeDecodeError:
        return "501 5.5.2 Credentials must be UTF-8"


def _peer_ip(session: SubmissionSession) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else str(peer)


def _protocol_name(session: SubmissionSession, envelope: SubmissionEnvelope) -> str:
    """RFC 3848 / RFC 6531 `with` keywords for the Received field."""
    name = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if session.tls else "")
    return name + ("A" if session.authenticated else "")

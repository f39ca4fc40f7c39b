"""The inbound listener for mail coming back: bounces (DSNs) to VERP addresses, complaints (ARF), and mail to
the `mailto:` unsubscribe address. It accepts mail only for mtad's own addresses and never relays.

RCPT decides by address alone (`b-TOKEN@bounce-domain`, `u-TOKEN@…`, `fbl@…`); anything else gets
550 5.7.1. After DATA the message is parsed (mtad.feedback.parse) and acted on:
- a DSN for a VERP address: the event is recorded with status and category; a hard bounce suppresses the
  address for that tenant (all classes); soft bounces and delays only record;
- an ARF report (to a VERP or an FBL address): a complaint suppresses the address for that tenant;
- an auto-reply (out of office, vacation) is recorded and is not a bounce;
- mail to u-TOKEN: an unsubscribe, like the one-click link.
When the database is unavailable the sender gets 451 4.3.0 and will retry.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.feedback.parse import FeedbackVerdict, parse_feedback
from mtad.feedback.store import FeedbackStore
from mtad.model import Reply
from mtad.observe.logs import log_event
from mtad.observe.metrics import BOUNCES, COMPLAINTS, UNSUBSCRIBES
from mtad.policy.bounce_rules import BounceRules
from mtad.policy.feedback_token import BOUNCE, UNSUBSCRIBE, read_feedback_address, read_token
from mtad.policy.log_privacy import LogPrivacy

log = logging.getLogger("mtad.feedback")
MAX_FEEDBACK_BYTES = 1024 * 1024
_TOKEN_IN_TEXT = re.compile(r"\b([bu])-([a-z2-7]{39})@", re.IGNORECASE)
_LINK_TOKEN = re.compile(r"/u/([a-z2-7]{39})\b", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    kind: str  # bounce | unsubscribe | fbl
    tenant_id: int = 0
    recipient_id: int = 0


class FeedbackHandler:
    def __init__(
        self,
        *,
        store: FeedbackStore,
        key: bytes,
        bounce_domain: str,
        fbl_local_parts: tuple[str, ...],
        rules: BounceRules,
        clock: Callable[[], datetime],
        privacy: LogPrivacy = LogPrivacy(),
    ) -> None:
        self._privacy = privacy
        self._store = store
        self._key = key
        self._domain = bounce_domain.lower()
        self._fbl = {p.lower() for p in fbl_local_parts}
        self._rules = rules
        self._clock = clock

    def target_of(self, address: str) -> Target | None:
        local, _, domain = address.rpartition("@")
        if self._domain and domain.lower() == self._domain and local.lower() in self._fbl:
            return Target("fbl")
        found = read_feedback_address(self._key, address, self._domain)
        if found is None:
            return None
        purpose, tenant_id, recipient_id = found
        return Target("bounce" if purpose == BOUNCE else "unsubscribe", tenant_id, recipient_id)

    async def handle_MAIL(self, server, session, envelope, address, options):
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.targets = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, options):
        target = self.target_of(address)
        if target is None:
            return "550 5.7.1 Relaying denied: this server accepts mail only for its own addresses"
        envelope.rcpt_tos.append(address)
        envelope.targets.append(target)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        content = (envelope.original_content or b"")[:MAX_FEEDBACK_BYTES]
        verdict = await asyncio.to_thread(parse_feedback, content, self._rules)
        try:
            for target in envelope.targets:
                await self.apply(target, verdict)
        except DATABASE_UNAVAILABLE:
            return "451 4.3.0 Temporarily unable to process; try again later"
        return "250 2.0.0 Ok: processed"

    async def handle_exception(self, error: Exception) -> str:
        """Without this aiosmtpd answers "500 Error: (ExceptionName) text": internals to a stranger, and a
        permanent failure that makes the remote side drop a report we could take on a retry."""
        log.exception("feedback session failed")
        return "451 4.3.0 Local error in processing; try again later"

    async def apply(self, target: Target, verdict: FeedbackVerdict) -> str:
        """Act on one verdict for one of our addresses; returns what was done (for logs and tests)."""
        if target.kind == "fbl":
            target = self._target_in_report(verdict) or target
            if target.kind == "fbl":
                log_event(log, "feedback.unmatched_complaint", reason=verdict.reason)
                return "unmatched"
        recipient = await self._store.target(target.tenant_id, target.recipient_id)
        if recipient is None:
            return "unknown recipient"
        now = self._clock()
        if target.kind == "unsubscribe":
            await self._store.unsubscribe(recipient, all_lists=False, source="mailto", now=now)
            UNSUBSCRIBES.labels("mailto").inc()
            log_event(log, "unsubscribe", tenant=recipient.tenant, source="mailto", recipient=self._who(recipient))
            return "unsubscribed"
        if verdict.kind == "complaint":
            await self._store.record_event(
                recipient.recipient_id, "complained", reply=None, category=verdict.feedback_type, source="arf", now=now
            )
            await self._store.suppress(
                recipient.tenant_id, recipient.address, "complaint", source="arf", detail=verdict.feedback_type, now=now
            )
            COMPLAINTS.inc()
            log_event(log, "feedback.complaint", tenant=recipient.tenant, recipient=self._who(recipient))
            return "complaint"
        if verdict.kind == "auto_reply":
            await self._store.record_event(
                recipient.recipient_id, "auto_reply", reply=None, category=None, source="auto_reply", now=now
            )
            return "auto_reply"
        if verdict.kind != "bounce" or not verdict.recipients:
            log_event(log, "feedback.not_understood", reason=verdict.reason)
            return "not understood"
        # The VERP address names the recipient; the report's own Final-Recipient is only a hint.
        report = next((r for r in verdict.recipients if r.action == "failed"), verdict.recipients[0])
        diagnostic = (report.diagnostic or report.action)[:500]
        code = re.match(r"\s*(?:smtp;\s*)?([245]\d\d)\b", diagnostic, re.IGNORECASE)
        reply = Reply(int(code.group(1)) if code else 0, report.status, diagnostic)
        await self._store.record_event(
            recipient.recipient_id, "dsn", reply=reply, category=report.category, source="dsn", now=now
        )
        if report.action == "failed":
            BOUNCES.labels("dsn", report.category).inc()
        if report.action == "failed" and report.hard:
            await self._store.suppress(
                recipient.tenant_id, recipient.address, "hard_bounce", source="dsn", detail=report.status, now=now
            )
            log_event(
                log, "feedback.hard_bounce", tenant=recipient.tenant, category=report.category,
                recipient=self._who(recipient),
            )
            return "hard bounce"
        log_event(log, "feedback.soft_bounce", tenant=recipient.tenant, category=report.category)
        return "soft bounce"

    def _who(self, recipient) -> str:
        return self._privacy.recipient(recipient.tenant_id, recipient.address)

    def _target_in_report(self, verdict: FeedbackVerdict) -> Target | None:
        """A complaint sent to the FBL address: find our VERP address or link token in the reported message."""
        texts = [verdict.original_envelope_from or ""] + list(verdict.original_headers.values())
        for text in texts:
            for match in _TOKEN_IN_TEXT.finditer(text):
                target = self.target_of(f"{match.group(1)}-{match.group(2)}@{self._domain}")
                if target is not None:
                    return target
            for match in _LINK_TOKEN.finditer(text):
                ids = read_token(self._key, UNSUBSCRIBE, match.group(1))
                if ids is not None:
                    return Target("bounce", *ids)
        return None

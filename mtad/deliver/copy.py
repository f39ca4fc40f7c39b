"""The copy that goes on the wire: envelope sender, List-Unsubscribe headers, DKIM signatures.

- Marketing mail gets, per recipient, `List-Unsubscribe: <https://…/u/TOKEN>, <mailto:u-TOKEN@bounce-domain>`
  and `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058); ingest removed any the tenant wrote, so
  the link is mtad's own, which works. They are added before signing, so DKIM covers them (h= lists them).
- With a bounce domain configured the envelope sender is a VERP address naming the recipient row
  (`b-TOKEN@bounce-domain`), so a bounce that comes back later is tied to exactly one recipient.
- Transactional mail is the same for every recipient: it is signed once per message and the signed bytes
  are cached; a marketing copy is signed once per recipient (the one header that differs is signed).
- Signing runs on the event loop. The RSA private-key operation (~0.25 ms for 2048 bits on the 2-core
  benchmark VM) releases the GIL, and it used to run on a thread of its own; but mtad runs one worker per
  core (`mtad run --workers`), so the other core is busy anyway, and the hand-off (a future per copy, a
  wake-up of the thread and of the loop, the GIL passed back and forth) cost more than the overlap gained:
  perf counted the signing thread at 0.35 ms of CPU per message, 0.1 ms above the RSA itself, and
  benchmarks/relay.py (see benchmarks/README.md) got faster without it. Even a lone worker on two cores
  gained nothing from the thread (relay.py --workers 1, alternating: 850/849 delivered/s with it, 810/872
  without).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mtad.model import Claim, MessageClass
from mtad.observe.logs import log_event
from mtad.observe.metrics import DKIM_SIGN
from mtad.policy.feedback_token import UNSUBSCRIBE, make_token, verp_address
from mtad.policy.message_text import from_addresses, header_fields, split_message
from mtad.queue.store import StoredMessage

log = logging.getLogger("mtad.deliver")
_SIGNED_CACHE_ENTRIES = 2000


class Signer(Protocol):
    def key_domain_for(self, from_domain: str) -> str | None: ...

    def sign(self, message: bytes, signing_domain: str, now: int) -> bytes: ...


@dataclass(frozen=True)
class FeedbackAddressing:
    key: bytes
    bounce_domain: str  # "" : no VERP and no mailto unsubscribe
    unsubscribe_url: str  # base the token is appended to


@dataclass(frozen=True)
class OutgoingCopy:
    mail_from: str
    data: bytes


class CopyMaker:
    def __init__(self, addressing: FeedbackAddressing, signer: Callable[[], Signer | None]) -> None:
        self._addressing = addressing
        self._signer = signer
        self._signed: OrderedDict[int, bytes] = OrderedDict()

    def one_recipient_per_copy(self, claim: Claim) -> bool:
        return claim.message_class is MessageClass.MARKETING or bool(self._addressing.bounce_domain)

    def make(self, message: StoredMessage, claim: Claim) -> OutgoingCopy:
        """The copy for `claim`'s recipient (and, for transactional mail without VERP, for its co-recipients)."""
        addressing = self._addressing
        mail_from = message.mail_from
        if addressing.bounce_domain:
            mail_from = verp_address(addressing.key, claim.tenant_id, claim.recipient_id, addressing.bounce_domain)
        if message.message_class is MessageClass.MARKETING:
            return OutgoingCopy(mail_from, self._sign(self._with_unsubscribe(message, claim)))
        signed = self._signed.get(message.id)
        if signed is None:
            signed = self._sign(message.body)
            self._signed[message.id] = signed
            while len(self._signed) > _SIGNED_CACHE_ENTRIES:
                self._signed.popitem(last=False)
        return OutgoingCopy(mail_from, signed)

    def _with_unsubscribe(self, message: StoredMessage, claim: Claim) -> bytes:
        addressing = self._addressing
        token = make_token(addressing.key, UNSUBSCRIBE, claim.tenant_id, claim.recipient_id)
        targets = [f"<{addressing.unsubscribe_url}{token}>"]
        if addressing.bounce_domain:
            targets.append(f"<mailto:u-{token}@{addressing.bounce_domain}?subject=unsubscribe>")
        added = (
            f"List-Unsubscribe: {', '.join(targets)}\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode("ascii")
        return added + message.body

    def _sign(self, data: bytes) -> bytes:
        signer = self._signer()
        if signer is None:
            return data
        addresses = from_addresses(header_fields(split_message(data)[0])) or []
        from_domain = addresses[0].rpartition("@")[2] if addresses else ""
        key_domain = signer.key_domain_for(from_domain) if from_domain else None
        if key_domain is None:
            return data
        try:
            with DKIM_SIGN.time():
                signature = signer.sign(data, key_domain, int(time.time()))
            return signature + data
        except ValueError as exc:  # cannot happen for mail stored by ingest (CRLF-normalised); say so if it does
            log_event(log, "dkim.sign_failed", logging.ERROR, domain=key_domain, error=str(exc))
            return data

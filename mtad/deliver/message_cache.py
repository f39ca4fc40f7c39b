"""Messages ready to send: loaded once from PostgreSQL, DKIM-signed once, kept in a bounded LRU.

Recipients of one message delivered in several transactions (several sites, retries) reuse the signed
bytes; the cache is bounded in bytes so a backlog of large messages cannot exhaust memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from mtad.observe.logs import log_event
from mtad.policy.message_text import from_addresses, header_fields, split_message
from mtad.queue.store import QueueStore


log = logging.getLogger("mtad.deliver")


class Signer(Protocol):
    def key_domain_for(self, from_domain: str) -> str | None: ...

    def sign(self, message: bytes, signing_domain: str, now: int) -> bytes: ...


@dataclass(frozen=True)
class ReadyMessage:
    message_id: int
    mail_from: str
    smtputf8: bool
    data: bytes


class MessageCache:
    def __init__(self, store: QueueStore, signer: Signer | None, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._store = store
        self.signer = signer
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[int, ReadyMessage] = OrderedDict()

    async def get(self, message_id: int) -> ReadyMessage | None:
        ready = self._entries.get(message_id)
        if ready is not None:
            self._entries.move_to_end(message_id)
            return ready
        stored = await self._store.load_message(message_id)
        if stored is None:
            return None
        ready = ReadyMessage(message_id, stored.mail_from, stored.smtputf8, self._signed(stored.body))
        self._entries[message_id] = ready
        self._bytes += len(ready.data)
        while self._bytes > self._max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.data)
        return ready

    def _signed(self, body: bytes) -> bytes:
        if self.signer is None:
            return body
        addresses = from_addresses(header_fields(split_message(body)[0])) or []
        from_domain = addresses[0].rpartition("@")[2].lower() if addresses else ""
        key_domain = self.signer.key_domain_for(from_domain) if from_domain else None
        if key_domain is None:
            return body
        try:
            return self.signer.sign(body, key_domain, int(time.time())) + body
        except ValueError as exc:  # cannot happen for mail stored by ingest (CRLF-normalised); say so if it does
            log_event(log, "dkim.sign_failed", logging.ERROR, domain=key_domain, error=str(exc))
            return body

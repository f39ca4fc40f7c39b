"""aiosmtpd's SMTP protocol, adapted: per-connection tenant state, enhanced codes, and drain tracking.

- `SubmissionSession` carries the tenant once AUTH succeeded (a STARTTLS starts a new session, RFC 3207 4.2).
- Every 4xx/5xx that aiosmtpd writes itself gets an RFC 3463 enhanced code (`policy.replies`).
- Open connections are kept in a registry so the daemon can drain them on shutdown.
- aiosmtpd 1.4.6 does not know an implicit-TLS transport is encrypted (issues #274/#281): the session's `tls`
  flag is read from the transport itself, and the implicit-TLS listener is built with auth_require_tls off
  (the whole connection is TLS), while our AUTH hook still refuses AUTH without TLS.
"""

from __future__ import annotations

import asyncio
from typing import AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session

from mtad.model import EnvelopeRecipient, Tenant
from mtad.policy.connection_limits import ConnectionLimits
from mtad.policy.replies import with_enhanced_code


class SubmissionSession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.tenant: Tenant | None = None
        self.tls = False
        self.trusted_lookup_done = False


class SubmissionEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[EnvelopeRecipient] = []


class SubmissionSMTP(SMTP):
    def __init__(
        self,
        handler: object,
        *,
        registry: set[SubmissionSMTP],
        limits: ConnectionLimits | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self._registry = registry
        self._limits = limits
        self._admitted_client: str | None = None

    def _create_session(self) -> SubmissionSession:
        return SubmissionSession(self.loop)

    def _create_envelope(self) -> SubmissionEnvelope:
        return SubmissionEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limits is not None and self._admitted_client is None:  # not again after STARTTLS
            peer = transport.get_extra_info("peername")
            client = peer[0] if isinstance(peer, tuple) else str(peer)
            refusal = self._limits.admit(client)
            if refusal is not None:
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._admitted_client = client
        super().connection_made(transport)
        self.session.tls = transport.get_extra_info("ssl_object") is not None
        self._registry.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted_client is None and self._limits is not None:
            return  # refused at connect: aiosmtpd never started a session
        if self._limits is not None:
            self._limits.release(self._admitted_client)
            self._admitted_client = None
        self._registry.discard(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        await super().push(with_enhanced_code(status) if isinstance(status, str) else status)

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: closing now would lose the client's message."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_with(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode("ascii") + b"\r\n")
            self.transport.close()

"""aiosmtpd's SMTP protocol, adapted: per-connection tenant state, enhanced codes, and drain tracking.

- `SubmissionSession` carries the tenant once AUTH succeeded (a STARTTLS starts a new session, RFC 3207 4.2).
- Every 4xx/5xx that aiosmtpd writes itself gets an RFC 3463 enhanced code (`policy.replies`).
- Every reply line is printable ASCII of at most 512 octets (RFC 5321 4.5.3.1.5): aiosmtpd echoes an
  unknown command verbatim ("500 Error: command "X\rY" not recognized"), bare CR, NUL and escape bytes
  included, which would hand the client a malformed or split reply.
- A client that sends garbage instead of a TLS handshake after STARTTLS is logged at info and cut off; it
  is the client's failure, not an error of mtad (anyone could otherwise fill the error log at will).
- "MAIL FROM:<" or "<a@" makes the email package's address parser raise IndexError instead of its
  HeaderParseError; aiosmtpd only catches the latter, so such an address is a 501 here, not a crash.
- Open connections are kept in a registry so the daemon can drain them on shutdown.
- aiosmtpd 1.4.6 does not know an implicit-TLS transport is encrypted (issues #274/#281): the session's `tls`
  flag is read from the transport itself, and the implicit-TLS listener is built with auth_require_tls off
  (the whole connection is TLS), while our AUTH hook still refuses AUTH without TLS.
"""

from __future__ import annotations

import asyncio
import logging
import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from mtad.model import EnvelopeRecipient, Tenant
from mtad.observe.logs import log_event
from mtad.policy.connection_limits import ConnectionLimits
from mtad.policy.replies import with_enhanced_code

log = logging.getLogger("mtad.ingest")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# <local@domain> with a dot-atom local part (RFC 5321 4.1.2) and an LDH domain: what nearly every client
# sends, parsed here without the email package; anything else goes the general way.
_PLAIN_PATH = re.compile(
    r"<([A-Za-z0-9!#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
)
MAX_REPLY_LINE = 510  # 512 with the CRLF


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
        if isinstance(status, str):
            status = _NOT_PRINTABLE.sub("?", with_enhanced_code(status))[:MAX_REPLY_LINE]
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parsing (email's RFC 5322 parser) without its per-call class definition (~2 % of the daemon
        in a py-spy profile of benchmarks/relay.py), a regular expression first for the plain <local@domain>
        every client sends (the email parser was ~5 %); and a parser crash is a syntax error."""
        if not arg:
            return "", ""
        plain = _PLAIN_PATH.match(arg)
        if plain is not None:
            address, rest = plain.group(1), arg[plain.end() :].lstrip()
        else:
            address, rest = self._parse_path(arg)
            if address is None:
                return None, None
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    @staticmethod
    def _parse_path(arg: str) -> tuple[str | None, str | None]:
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
            return address.addr_spec, rest
        except (HeaderParseError, IndexError, ValueError):
            return None, None  # aiosmtpd answers 501/553 Syntax

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection after this
            log_event(log, "smtp.tls_handshake_failed", error=repr(error.__cause__)[:200])
            return "421 4.7.0 TLS negotiation failed"
        return await super().handle_exception(error)

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: closing now would lose the client's message."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_with(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode("ascii") + b"\r\n")
            self.transport.close()

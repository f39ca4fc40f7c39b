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
- PIPELINING (RFC 2920) is offered: the replies to MAIL, RCPT and RSET are held while the client's next command
  is already read, and leave with the next reply that is not held (the 354 to DATA, at the latest), so a
  pipelined MAIL/RCPT.../DATA group costs one write instead of one per command; the lines of a multi-line reply
  (EHLO) go out in one write too. Only those three commands' replies wait: a STARTTLS or QUIT reply must be on
  the wire before the connection changes, and a reply is never held while the client may be waiting for it.
  DATA with every recipient refused answers 554 "no valid recipients" (the pipelining client sent it blind).
- DATA is read in blocks up to the end-of-data line, not line by line: aiosmtpd's loop awaited once per
  line (~100 times for a 5 KB message) and was ~8 % of the event loop in a py-spy profile of
  benchmarks/relay.py. Limits, replies and dot-unstuffing are aiosmtpd's (RFC 5321 4.5.2, 4.5.3.1.6).
- aiosmtpd 1.4.6 does not know an implicit-TLS transport is encrypted (issues #274/#281): the session's `tls`
  flag is read from the transport itself, and the implicit-TLS listener is built with auth_require_tls off
  (the whole connection is TLS), while our AUTH hook still refuses AUTH without TLS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException

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
_END_OF_DATA = b"\r\n.\r\n"
_READ_BLOCK = 65536
TOO_MUCH_DATA = "552 Error: Too much mail data"
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"


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
        self.recipient_tried = False  # a RCPT came, accepted or not: DATA without recipients is 554, not 503


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
        self._held_replies = bytearray()
        self._reply_may_wait = False  # while MAIL, RCPT or RSET runs

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
            line = _NOT_PRINTABLE.sub("?", with_enhanced_code(status))[:MAX_REPLY_LINE].encode("ascii")
        else:
            line = status
        self._held_replies += line + b"\r\n"
        if line[3:4] == b"-" or (self._reply_may_wait and b"\n" in self._reader._buffer):
            return  # a continuation line, or the client's next command is here already: it is not waiting
        self._writer.write(bytes(self._held_replies))
        self._held_replies.clear()
        await self._writer.drain()

    # The overrides keep aiosmtpd's syntax attributes (functools.wraps), which its HELP lists commands by.

    @functools.wraps(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str) -> None:
        await self._reply_may_wait_for_the_next(super().smtp_MAIL, arg)

    @functools.wraps(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str) -> None:
        self.envelope.recipient_tried = True
        await self._reply_may_wait_for_the_next(super().smtp_RCPT, arg)

    @functools.wraps(SMTP.smtp_RSET)
    async def smtp_RSET(self, arg: str) -> None:
        await self._reply_may_wait_for_the_next(super().smtp_RSET, arg)

    async def _reply_may_wait_for_the_next(self, command: Callable[[str], Awaitable[None]], arg: str) -> None:
        self._reply_may_wait = True
        try:
            await command(arg)
        finally:
            self._reply_may_wait = False

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

    @functools.wraps(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push(NO_VALID_RECIPIENTS if self.envelope.recipient_tried else "503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, refusal = await self._read_data()
        if content is None and refusal is None:
            return  # the client went away mid-message
        if refusal is not None:
            await self.push(refusal)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytes | None, str | None]:
        """(content, None), (None, refusal reply), or (None, None) when the connection ended first.

        A CRLF is put in front so that an end-of-data line first of all is found like any other; past the
        size limit only the last 4 octets are kept (the end-of-data line may straddle two blocks)."""
        limit = self.data_size_limit
        data = bytearray(b"\r\n")
        searched = 0
        too_much = False
        while (end := data.find(_END_OF_DATA, searched)) < 0:
            if limit and len(data) > limit + 2:
                too_much = True
                del data[:-4]
            searched = max(0, len(data) - 4)
            try:
                block = await self._reader.read(_READ_BLOCK)
            except asyncio.CancelledError:
                self._writer.close()  # as aiosmtpd: the connection was reset during DATA
                raise
            if not block:
                return None, None
            data += block
        rest = data[end + len(_END_OF_DATA) :]
        if rest:  # the client's next command, already read: give it back to the reader
            self._reader._buffer[:0] = rest
        if too_much or (limit and end > limit):
            return None, TOO_MUCH_DATA
        content = bytes(data[2 : end + 2])
        if len(content) > self.line_length_limit and max(map(len, content.split(b"\r\n"))) > self.line_length_limit - 2:
            return None, LINE_TOO_LONG
        content = content.replace(b"\r\n.", b"\r\n")  # dot-unstuffing (RFC 5321 4.5.2)
        return (content[1:] if content.startswith(b".") else content), None

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
            self.transport.write(bytes(self._held_replies) + reply.encode("ascii") + b"\r\n")
            self._held_replies.clear()
            self.transport.close()

"""Outbound SMTP connections: open, EHLO, STARTTLS (with aiosmtplib), then an `SmtpSession` for transactions.

A connection is opened to the first MX address that answers, in preference order. STARTTLS is used whenever
offered (opportunistic), required when the shape says `tls = "required"`, and the certificate is checked
against the MX host *name* (never the IP) when `tls_verify` is on. Failures become values:
`SessionFailure` for anything that says nothing about the recipients (connect, greeting, TLS, a dropped
connection), so the caller can give the window negative feedback and retry the recipients elsewhere.

Timeouts (RFC 5321 4.5.3.2): `connect_s` bounds the TCP handshake only; the 220 greeting, EHLO and STARTTLS
are commands and get `command_s` (4.5.3.2.1: "Initial 220 Message: 5 Minutes"), so a slow-to-greet server
is given the time the RFC asks for, and a stall ends with a reason naming what we waited for and how long.
A reply that is not SMTP at all (no three-digit code) is a protocol error of the session, never a reply
class: it becomes a 451 4.5.0 and the connection is not used again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib

from mtad.deliver.smtp_session import SmtpSession
from mtad.model import MxHost, Reply, Route
from mtad.policy.shaping import ShapeLimits

CONNECTION_ERRORS = (
    aiosmtplib.SMTPException,
    OSError,
    asyncio.TimeoutError,
    ssl.SSLError,
    UnicodeError,
)


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 section 4.5.3.2 minimums as defaults: 5 min for the greeting and commands, 10 min after DATA."""

    connect_s: float = 30.0
    command_s: float = 300.0
    data_s: float = 600.0


class SessionFailure(Exception):
    def __init__(self, reply: Reply, throttled: bool = False) -> None:
        super().__init__(f"{reply.code} {reply.enhanced or ''} {reply.text}".strip())
        self.reply = reply
        self.throttled = throttled


@dataclass
class OutboundConnection:
    session: SmtpSession
    extensions: frozenset[str]  # the EHLO keywords, lower case (after STARTTLS: the second EHLO's)
    mx: MxHost
    address: str
    tls_version: str | None
    opened_at: float
    last_used: float
    deliveries: int = 0
    key: tuple = field(default_factory=tuple)
    idle_timeout_s: float = 30.0
    provider: str = "other"

    @property
    def is_usable(self) -> bool:
        return self.session.is_open

    async def close(self) -> None:
        if self.session.is_open:
            await self.session.quit(timeout_s=5)
        else:
            self.session.close()


def is_smtp_reply_code(code: int) -> bool:
    """aiosmtplib reports a line without a reply code as code -1; RFC 5321 4.2 codes are 2xx to 5xx."""
    return 200 <= code <= 599


def reply_of(code: int, message: str) -> Reply:
    """aiosmtplib gives the code and the rest of the text; split off an RFC 3463 enhanced code.
    A code that is no SMTP reply code becomes 451 4.5.0 (protocol error): temporary, never a verdict."""
    text = " ".join(message.split())
    if not is_smtp_reply_code(code):
        return Reply(451, "4.5.0", f"invalid SMTP reply: {text}"[:300])
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    return Reply(code, None, text)


async def open_connection(
    route: Route, limits: ShapeLimits, *, ehlo_name: str, timeouts: Timeouts, verify_context: ssl.SSLContext
) -> OutboundConnection:
    """Try each MX address in order; raise SessionFailure with the last error when none works."""
    last: SessionFailure | None = None
    for mx in route.hosts:
        for address in mx.addresses:
            try:
                return await _open_one(mx, address, route.port, limits, ehlo_name, timeouts, verify_context)
            except SessionFailure as failure:
                last = failure
                if failure.throttled:
                    raise  # a 421 greeting: the site asks us to slow down, trying its other hosts won't help
    raise last or SessionFailure(Reply(451, "4.4.1", "no MX address to connect to"))


async def _open_one(mx, address, port, limits, ehlo_name, timeouts, verify_context) -> OutboundConnection:
    where = f"{mx.name} [{address}]"
    sock = await _tcp_connect(where, address, port, timeouts.connect_s)
    # aiosmtplib owns the socket from here on: no await before connect() hands it to the transport.
    client = aiosmtplib.SMTP(
        hostname=address,
        sock=sock,
        local_hostname=ehlo_name,
        timeout=timeouts.command_s,
        start_tls=False,
        use_tls=False,
    )
    stage = "greeting"
    try:
        await client.connect(timeout=timeouts.command_s)
        stage = "EHLO"
        await client.ehlo()  # the extensions decide STARTTLS, SMTPUTF8 and 8BITMIME
        tls_version = None
        if limits.tls != "disabled" and client.supports_extension("starttls"):
            stage = "STARTTLS"
            context = verify_context if limits.tls_verify else _opportunistic_context()
            await client.starttls(server_hostname=mx.name, tls_context=context)
            ssl_object = client.get_transport_info("ssl_object")
            tls_version = ssl_object.version() if ssl_object else "TLS"
            stage = "EHLO"
            await client.ehlo()  # RFC 3207 4.2: what the server offers is known again only after a new EHLO
        elif limits.tls == "required":
            raise SessionFailure(Reply(451, "4.7.5", f"{mx.name} does not offer STARTTLS and TLS is required"))
    except SessionFailure:
        client.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:  # a refusing greeting (SMTPConnectResponseError) included
        client.close()
        reply = reply_of(exc.code, exc.message)
        raise SessionFailure(_at(reply, where, stage), throttled=exc.code == 421) from None
    except (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError):
        client.close()
        waited = f"no {stage} reply within {timeouts.command_s:g}s (command_timeout)"
        raise SessionFailure(Reply(451, "4.4.2", f"{where}: {waited}")) from None
    except CONNECTION_ERRORS as exc:
        client.close()
        raise SessionFailure(Reply(451, "4.4.2", f"{where}: {stage}: {type(exc).__name__}: {exc}"[:300])) from None
    now = time.monotonic()
    extensions = frozenset(client.esmtp_extensions)
    session = SmtpSession.take_over(client.transport, bytes(client.protocol._buffer))  # unread: none, normally
    return OutboundConnection(session, extensions, mx, address, tls_version, now, now)


async def _tcp_connect(where: str, address: str, port: int, timeout_s: float) -> socket.socket:
    """The TCP handshake alone, bounded by connect_timeout (aiosmtplib would bound the greeting with it too)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), timeout_s)
    except asyncio.TimeoutError:
        sock.close()
        waited = f"no answer within {timeout_s:g}s (connect_timeout)"
        raise SessionFailure(Reply(451, "4.4.1", f"{where}: connect: {waited}")) from None
    except OSError as exc:
        sock.close()
        raise SessionFailure(Reply(451, "4.4.1", f"{where}: connect: {type(exc).__name__}: {exc}"[:300])) from None
    except BaseException:  # cancelled: do not leak the descriptor
        sock.close()
        raise
    return sock


def _at(reply: Reply, where: str, stage: str) -> Reply:
    """A session-level refusal, with where and when it came, so the recorded reason says it."""
    if reply.code == 451 and reply.enhanced == "4.5.0":  # ours: a line that was not SMTP
        return Reply(451, "4.5.0", f"{where}: {stage}: {reply.text}"[:300])
    return reply


def _opportunistic_context() -> ssl.SSLContext:
    # Opportunistic TLS (RFC 7435): encrypt with whatever certificate the MX shows; better than plain text.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context

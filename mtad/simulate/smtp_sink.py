"""Programmable SMTP sinks: the remote MX servers mtad delivers to, each on its own loopback address.

A `SmtpSink` runs aiosmtpd's `SMTP` protocol on the test's event loop (`loop.create_server`, not the threaded
Controller, so tests and sinks share one loop and one clock) bound to 127.0.0.x: Linux routes all of 127/8 to
lo, so several "MX hosts" can listen on the same port at different IPs, as real MX servers all listen on 25.
`free_port_on(ips)` finds such a shared port.

A sink records what a receiving MTA would have seen (`messages`, connection counters, `rejections`) and
misbehaves on request through `SinkBehaviour`, read live: assign `sink.behaviour = SinkBehaviour(...)` or
change one field (`sink.behaviour.stall_greeting_s = 0.5`) while the daemon is connected. What it simulates:

- per-recipient temporary/permanent refusals at RCPT (by address or by domain);
- greylisting: `greylist=True` answers 450 4.2.0 to the first RCPT of each recipient and accepts it later;
- a DATA reply override (greylisting style "452 4.3.1", content filter "554 5.7.1"), optionally only for the
  first K messages after the behaviour was set;
- a server that accepts N messages per connection and then answers MAIL with 421 and hangs up;
- a connection cap: above N concurrent sessions, a new connection is greeted with 421 and closed;
- slow servers: a stalled greeting, a stalled reply to the final "." of DATA;
- a connection dropped while the client sends the message body;
- a server that accepts the TCP connection and closes it at once, or right after its 220 greeting;
- STARTTLS with a self-signed certificate for the sink's hostname (`certificate_pem` lets a test trust it;
  a client that checks certificates against its system CAs refuses it), or STARTTLS advertised but broken:
  the sink closes the socket right after its 220 (`tls_fails`), or answers the TLS ClientHello with bytes
  that are not TLS (`tls_garbage_handshake`);
- something that is not an SMTP server at all (a non-SMTP greeting, then the sink hangs up), or a reply that
  is not SMTP to the final "." (`data_reply=GARBAGE_REPLY`).

`session_spans` records when each connection opened, when the last "." of DATA arrived on it and when it
closed, so a test can tell which of the client's timeouts ended a stall.

A message counts as received only once the sink has decided to answer 2xx to its DATA; a client that hangs up
during `stall_after_data_s` leaves nothing in `messages`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import logging
import random
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections"
TRY_AGAIN_LATER = "421 4.7.0 Try again later"
GARBAGE_GREETING = "* OK [CAPABILITY IMAP4rev1] Dovecot ready."  # what a mis-pointed MX might say
GARBAGE_REPLY = "Thank you, your message will be read shortly"  # no reply code: a broken filter's answer
NOT_TLS = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # what a middlebox might answer to a TLS ClientHello
ACCEPTED = "250 2.0.0 OK queued"
RECIPIENT_OK = "250 2.1.5 OK"
GREYLISTED = "450 4.2.0 Greylisted, please try again later"
DROPPED = "(connection dropped during DATA)"
TLS_BROKEN = "(connection closed instead of TLS handshake)"
TLS_GARBAGE = "(bytes that are not TLS instead of a TLS handshake)"
CLOSED_ON_CONNECT = "(connection closed before any greeting)"
CLOSED_AFTER_GREETING = "(connection closed right after the greeting)"
DROP_READ_TIMEOUT_S = 5.0  # how long a dropping sink waits for the first body bytes before dropping anyway
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 50


@dataclass
class SinkBehaviour:
    recipient_replies: dict[str, str] = field(default_factory=dict)  # "user@dom" or "dom" -> "550 5.1.1 ..."
    data_reply: str | None = None  # the reply to the final "." instead of 250
    data_reply_for_first: int | None = None  # only the first K DATA get data_reply; None = every one
    reply_421_after_messages: int | None = None  # per connection
    max_concurrent_sessions: int | None = None
    stall_greeting_s: float = 0.0
    stall_after_data_s: float = 0.0
    drop_mid_data: bool = False
    starttls: bool = False
    tls_fails: bool = False  # advertise STARTTLS, then close instead of the handshake
    tls_garbage_handshake: bool = False  # advertise STARTTLS, say 220, then answer the handshake with non-TLS
    garbage_greeting: bool = False
    close_on_connect: bool = False  # accept the TCP connection and close it without a word
    close_after_greeting: bool = False  # send the 220 greeting, then close
    hang_up_at_rset: bool = False  # answer RSET with 421 and close (an idle timeout racing the client's probe)
    greylist: bool = False  # 450 4.2.0 on the first RCPT of each recipient address, accepted from then on
    pipelining: bool = True  # advertise PIPELINING (RFC 2920), as every large provider does


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple[str, int]
    tls: bool
    received_at: float  # time.monotonic()
    session_id: int
    mail_at: float = 0.0  # time.monotonic() when its MAIL FROM arrived (the start of the attempt, as seen here)


@dataclass
class SessionSpan:
    """One connection as the sink saw it (time.monotonic() values); data_ended_at: the last "." of DATA."""

    session_id: int
    opened_at: float
    closed_at: float
    data_ended_at: float | None


@dataclass
class Rejection:
    """One refusal the sink gave: stage is CONNECT, MAIL, RCPT, DATA or STARTTLS."""

    stage: str
    reply: str
    address: str | None
    session_id: int
    at: float  # time.monotonic()


def free_port_on(ips: list[str] | tuple[str, ...]) -> int:
    """A TCP port that is free on every one of the given addresses right now (the caller binds it next)."""
    for _ in range(PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((ips[0], 0))
            port = probe.getsockname()[1]
            if all(_port_is_free(ip, port) for ip in ips[1:]):
                return port
    raise RuntimeError(f"no TCP port free on all of {ips} after {PORT_ATTEMPTS} attempts")


def free_consecutive_ports_on(ips: list[str] | tuple[str, ...], count: int) -> int:
    """The first of `count` consecutive TCP ports free on every one of the given addresses (for `mtad run
    --workers N`, whose worker k listens on the configured port + k).

    Chosen below the kernel's ephemeral range: a port next to one the kernel handed out is in that range, where
    any outgoing connection (the daemon's own, to its sinks) may take it as its source port before the worker
    binds it, and the worker then fails with EADDRINUSE."""
    candidates = random.Random().sample(range(10000, max(10001, _lowest_ephemeral_port() - count)), PORT_ATTEMPTS)
    for first in candidates:
        if all(_port_is_free(ip, port) for ip in ips for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive TCP ports free on all of {ips} after {PORT_ATTEMPTS} attempts")


def _lowest_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _port_is_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, port))
        except OSError:
            return False
        return True


def self_signed_certificate(hostname: str, ip: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): ECDSA P-256, CN and DNS SAN = hostname, IP SAN = the sink's address."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.timezone.utc)
    names = [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(ip))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)  # its own trust anchor
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _server_context(certificate_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain only reads files
        cert_path, key_path = Path(directory, "sink.crt"), Path(directory, "sink.key")
        cert_path.write_bytes(certificate_pem)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context


class _SinkHandler:
    """aiosmtpd hooks: decide each reply from the sink's current behaviour and record the outcome."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self, server: _SinkSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self._sink.behaviour.pipelining:  # aiosmtpd reads commands in order, so it copes with pipelining
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: _SinkSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._sink.transactions_total += 1
        envelope.mail_at = time.monotonic()  # type: ignore[attr-defined]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: _SinkSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink._reply_for_recipient(address)
        if reply is not None and not reply.startswith("2"):
            self._sink._reject("RCPT", reply, address, server.session_id)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or RECIPIENT_OK

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        server.data_ended_at = time.monotonic()
        stall = self._sink.behaviour.stall_after_data_s
        if stall:
            await asyncio.sleep(stall)
        reply = self._sink._take_data_reply()
        if reply is not None and not reply.startswith("2"):
            self._sink._reject("DATA", reply, envelope.mail_from, server.session_id)
            return reply
        server.messages_on_connection += 1
        self._sink._record(server, session, envelope)
        return reply or ACCEPTED

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client refused our certificate: its call, not a sink bug
            return "421 4.7.0 TLS handshake failed"  # aiosmtpd closes without sending it
        log.exception("SMTP sink session failed")
        return f"500 5.0.0 sink error: {error!r}"


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol with the misbehaviours that its hooks cannot express (they happen outside them)."""

    def __init__(self, sink: SmtpSink, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(
            _SinkHandler(sink),
            hostname=sink.hostname,
            ident="ESMTP sink",
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            timeout=sink.idle_timeout_s,
            loop=asyncio.get_running_loop(),
        )
        self.sink = sink
        self.session_id = 0
        self.admitted = False
        self.messages_on_connection = 0
        self.opened_at = time.monotonic()
        self.data_ended_at: float | None = None
        self._closed_once = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        is_new_connection = self._original_transport is None  # it is called again after STARTTLS
        super().connection_made(transport)
        if is_new_connection:
            self.sink._session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self._closed_once:  # aiosmtpd may call this twice after a failed TLS setup
            self._closed_once = True
            self.sink._session_closed(self)

    def eof_received(self) -> bool | None:
        """The client hung up: close our side too. aiosmtpd (via StreamReaderProtocol) would keep a plain
        connection half-open until its idle timeout, so a stalled session would look alive for 30 s."""
        super().eof_received()
        return False  # asyncio closes the transport, and connection_lost records the session's end

    async def _handle_client(self) -> None:
        """Everything before the 220 greeting; aiosmtpd sends that greeting first thing in this method."""
        behaviour = self.sink.behaviour
        if not self.admitted:
            self.sink._reject("CONNECT", TOO_MANY_CONNECTIONS, None, self.session_id)
            await self._hang_up(TOO_MANY_CONNECTIONS)
            return
        if behaviour.close_on_connect:
            self.sink._reject("CONNECT", CLOSED_ON_CONNECT, None, self.session_id)
            if self.transport is not None:
                self.transport.close()
            return
        if behaviour.stall_greeting_s:
            await asyncio.sleep(behaviour.stall_greeting_s)
        if behaviour.garbage_greeting:
            await self._hang_up(GARBAGE_GREETING)
            return
        if behaviour.close_after_greeting:
            self.sink._reject("CONNECT", CLOSED_AFTER_GREETING, None, self.session_id)
            await self._hang_up(f"220 {self.hostname} {self.__ident__}")
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        limit = self.sink.behaviour.reply_421_after_messages
        if limit is not None and self.messages_on_connection >= limit:
            self.sink._reject("MAIL", TRY_AGAIN_LATER, None, self.session_id)
            await self._hang_up(TRY_AGAIN_LATER)
            return
        await super().smtp_MAIL(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if self.sink.behaviour.hang_up_at_rset:
            await self._hang_up("421 4.4.2 idle too long, closing")
            return
        await super().smtp_RSET(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if not (self.sink.behaviour.drop_mid_data and self.envelope.rcpt_tos and not arg):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:  # let some of the body arrive, so the client is mid-message when the line goes dead
            await asyncio.wait_for(self._reader.read(1024), DROP_READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        self.sink._reject("DATA", DROPPED, self.envelope.mail_from, self.session_id)
        if self.transport is not None:
            self.transport.abort()

    async def smtp_STARTTLS(self, arg: str) -> None:
        behaviour = self.sink.behaviour
        if arg or not (behaviour.tls_fails or behaviour.tls_garbage_handshake):
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        broken = TLS_GARBAGE if behaviour.tls_garbage_handshake else TLS_BROKEN
        self.sink._reject("STARTTLS", broken, None, self.session_id)
        if self.transport is None:
            return
        if behaviour.tls_garbage_handshake:
            try:  # let the ClientHello arrive first, so the client is mid-handshake when the junk comes
                await asyncio.wait_for(self._reader.read(1), DROP_READ_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
            self.transport.write(NOT_TLS)
        self.transport.close()

    async def _hang_up(self, line: str) -> None:
        """Say one last line and close, as servers do with 421 (RFC 5321 3.8)."""
        try:
            await self.push(line)
        except ConnectionError:
            pass  # the client left first
        if self.transport is not None:
            self.transport.close()


class SmtpSink:
    def __init__(
        self,
        host: str = "127.0.0.2",
        port: int = 0,
        behaviour: SinkBehaviour | None = None,
        *,
        hostname: str = "mx.example.net",
        idle_timeout_s: float = 30.0,
        **behaviour_fields: object,
    ) -> None:
        """`behaviour_fields` are SinkBehaviour fields, a shortcut: SmtpSink(ip, port, drop_mid_data=True)."""
        self.host = host
        self.port = port
        self.hostname = hostname
        self.idle_timeout_s = idle_timeout_s
        behaviour = behaviour or SinkBehaviour()
        if behaviour_fields:
            behaviour = dataclasses.replace(behaviour, **behaviour_fields)  # type: ignore[arg-type]
        self.behaviour = behaviour
        self.messages: list[ReceivedMessage] = []
        self.rejections: list[Rejection] = []
        self.connections_total = 0
        self.rejected_connections = 0
        self.current_sessions = 0
        self.max_concurrent_sessions = 0  # the high-water mark; the cap is behaviour.max_concurrent_sessions
        self.transactions_total = 0  # MAIL commands accepted
        self.session_spans: list[SessionSpan] = []  # closed connections, in the order they closed
        self.greylisted: set[str] = set()  # recipients seen once by a greylisting sink (lower case)
        self._sessions: set[_SinkSMTP] = set()  # every live connection, admitted or not
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Event()
        self._tls: tuple[str, ssl.SSLContext] | None = None

    # ---- life cycle -------------------------------------------------------------------------------------

    async def start(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and cut every live session (their stalls are cancelled with them)."""
        if self._server is None:
            return
        self._server.close()
        handlers = [s._handler_coroutine for s in self._sessions if s._handler_coroutine is not None]
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abort()
        if handlers:
            await asyncio.wait(handlers, timeout=STOP_TIMEOUT_S)
        await asyncio.wait_for(self._server.wait_closed(), STOP_TIMEOUT_S)
        self._server = None

    async def __aenter__(self) -> SmtpSink:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- what tests read ----------------------------------------------------------------------------------

    @property
    def behaviour(self) -> SinkBehaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: SinkBehaviour) -> None:
        self._behaviour = behaviour
        self._data_replies_given = 0  # data_reply_for_first counts from the moment the behaviour was set

    @property
    def certificate_pem(self) -> str:
        """The sink's self-signed certificate (also its own CA): `ssl_context.load_verify_locations(cadata=...)`."""
        return self._tls_material()[0]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def wait_for_messages(self, n: int, timeout_s: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least n messages were accepted; raise TimeoutError saying what arrived instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.messages) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"sink {self.host}:{self.port} got {len(self.messages)} of {n} messages in {timeout_s}s; "
                    f"{self.connections_total} connections, rejections: {[r.reply for r in self.rejections]}"
                )
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return list(self.messages)

    # ---- called by the protocol -----------------------------------------------------------------------------

    def _new_protocol(self) -> _SinkSMTP:
        wants_tls = self.behaviour.starttls or self.behaviour.tls_fails or self.behaviour.tls_garbage_handshake
        return _SinkSMTP(self, self._tls_material()[1] if wants_tls else None)

    def _tls_material(self) -> tuple[str, ssl.SSLContext]:
        if self._tls is None:  # generated on first use: most sinks never speak TLS
            certificate_pem, key_pem = self_signed_certificate(self.hostname, self.host)
            self._tls = certificate_pem.decode("ascii"), _server_context(certificate_pem, key_pem)
        return self._tls

    def _session_opened(self, session: _SinkSMTP) -> None:
        self.connections_total += 1
        session.session_id = self.connections_total
        self._sessions.add(session)
        cap = self.behaviour.max_concurrent_sessions
        if cap is not None and self.current_sessions >= cap:
            self.rejected_connections += 1  # it gets its 421 greeting and never counts as a session
            return
        session.admitted = True
        self.current_sessions += 1
        self.max_concurrent_sessions = max(self.max_concurrent_sessions, self.current_sessions)

    def _session_closed(self, session: _SinkSMTP) -> None:
        self._sessions.discard(session)
        self.session_spans.append(
            SessionSpan(session.session_id, session.opened_at, time.monotonic(), session.data_ended_at)
        )
        if session.admitted:
            self.current_sessions -= 1

    def _reply_for_recipient(self, address: str) -> str | None:
        replies = {key.lower(): reply for key, reply in self.behaviour.recipient_replies.items()}
        address = address.lower()
        reply = replies.get(address) or replies.get(address.rpartition("@")[2])
        if reply is None and self.behaviour.greylist and address not in self.greylisted:
            self.greylisted.add(address)
            return GREYLISTED
        return reply

    def _take_data_reply(self) -> str | None:
        behaviour = self.behaviour
        if behaviour.data_reply is None:
            return None
        if behaviour.data_reply_for_first is not None and self._data_replies_given >= behaviour.data_reply_for_first:
            return None
        self._data_replies_given += 1
        return behaviour.data_reply

    def _reject(self, stage: str, reply: str, address: str | None, session_id: int) -> None:
        self.rejections.append(Rejection(stage, reply, address, session_id, time.monotonic()))

    def _record(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> None:
        self.messages.append(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                peer=tuple(session.peer[:2]),  # type: ignore[arg-type]
                tls=session.ssl is not None,
                received_at=time.monotonic(),
                session_id=server.session_id,
                mail_at=getattr(envelope, "mail_at", 0.0),
            )
        )
        self._arrived.set()

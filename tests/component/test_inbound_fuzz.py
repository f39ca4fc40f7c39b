"""Hypothesis drives real SMTP conversations, byte by byte, against one `mtad run` process per module: the
submission listener (authenticated and not) and the inbound feedback listener.

Invariants, whatever the client sends (random verbs and arguments, raw bytes, over-long lines, NUL, 8-bit
junk, broken MIME, huge headers, relay tricks):
- every reply is a well-formed SMTP reply (RFC 5321 4.2: code, separator, text, CRLF, at most 512 bytes);
  every 4xx/5xx line carries an RFC 3463 enhanced code of the same class; no Python error leaks out;
- the connection is only closed after the server said why (221, 421, or 502 for too many bogus commands);
- a valid message sent on the same connection after the junk is stored intact (submission) or acted on
  (feedback listener);
- nothing is stored from a session that never authenticated (no relay);
- the daemon stays up and logs no error.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.daemon import (
    PASSWORD,
    DaemonProcess,
    add_test_tenants,
    daemon_document,
    write_config,
)
from support.postgres import create_test_database, drop_test_database, url_for
from support.queue import queue_messages
from support.smtp_client import RawSMTP, insecure_client_context

from mtad.policy.feedback_token import verp_address

BOUNCE_DOMAIN = "bounces.mtad.example"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
VALID_MESSAGE = (
    b"From: Acme News <news@acme.example>\r\n"
    b"To: someone@example.net\r\n"
    b"Subject: after the junk\r\n"
    b"\r\n"
    b"This message must arrive byte for byte.\r\n"
)
VALID_RECIPIENTS = ("first@example.net", "second@example.org")
SOFT_BOUNCE = re.sub(rb"\r?\n", b"\r\n", (FIXTURES / "postfix_mailbox_full.eml").read_bytes())

REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])([^\r\n]*)\r\n$")
ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?: |$)")
GOODBYE = re.compile(r"^(221|421)[ -]|^502[ -]5\.5\.1 Too many unrecognized")
LEAKED_ERROR = re.compile(r"Error: \(\w+\)|Traceback|Local error")

fuzz = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class FuzzDaemon:
    process: DaemonProcess
    runner: asyncio.Runner
    pool: asyncpg.Pool
    submission_port: int
    feedback_port: int
    key: bytes
    verp_for_junk: str  # a queued recipient's VERP address, for fuzzed reports
    verp_for_check: str  # another one: its soft bounce events prove the listener still works
    check_recipient_id: int

    def run(self, coroutine):
        return self.runner.run(coroutine)

    def assert_healthy(self) -> None:
        assert self.process.process.poll() is None, "the daemon died"
        bad = [e for e in self.process.events() if e.get("level") in ("error", "critical") or "exception" in e]
        assert not bad, [(e["event"], e.get("exception", "")[-1200:]) for e in bad[:2]]


async def open_pool(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=1, max_size=2)


@pytest.fixture(scope="module")
def fuzz_daemon(pg_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    key = secrets.token_bytes(32)
    (tmp / "feedback.key").write_text(key.hex() + "\n")
    runner = asyncio.Runner()
    name = runner.run(create_test_database(pg_cluster))
    url = url_for(pg_cluster, name)
    pool = runner.run(open_pool(url))
    runner.run(add_test_tenants(pool))
    runner.run(queue_messages(pool, [["junk@a.example"], ["check@a.example"]]))
    ids = runner.run(pool.fetch("SELECT id, tenant_id, address FROM recipients ORDER BY id"))
    verp = {row["address"]: verp_address(key, row["tenant_id"], row["id"], BOUNCE_DOMAIN) for row in ids}
    feedback_port = free_port()
    document = daemon_document(
        url, tmp / "state", max_failed_logins=100_000, max_recipients=5, max_message_size="256KB"
    )
    document["http"] = {"listen": [f"127.0.0.1:{free_port()}"]}
    document["feedback"] = {
        "listen": [f"127.0.0.1:{feedback_port}"],
        "bounce_domain": BOUNCE_DOMAIN,
        "secret_file": str(tmp / "feedback.key"),
    }
    process = DaemonProcess(write_config(tmp / "mtad.toml", document))
    process.start()
    try:
        yield FuzzDaemon(
            process, runner, pool, process.ports[0], feedback_port, key,
            verp["junk@a.example"], verp["check@a.example"], ids[1]["id"],
        )
    finally:
        process.signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            process.kill()
            runner.run(pool.close())
            runner.run(drop_test_database(pg_cluster, name))
            runner.close()


# --- a client that checks every reply ---------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection; `announced` when its last reply said goodbye first."""

    def __init__(self, announced: bool) -> None:
        super().__init__("closed after a goodbye" if announced else "closed without a reply")
        self.announced = announced


class CheckedSMTP:
    def __init__(self, client: RawSMTP) -> None:
        self.client = client
        self.last_reply = ""

    @classmethod
    async def open(cls, port: int) -> CheckedSMTP:
        client, _ = await RawSMTP.open(port)
        return cls(client)

    async def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            try:
                raw = await asyncio.wait_for(self.client.reader.readline(), 20)
            except (ConnectionError, ssl.SSLError):
                raw = b""
            if not raw:
                raise Closed(bool(GOODBYE.match(self.last_reply)))
            assert len(raw) <= 512, raw[:100]
            match = REPLY_LINE.match(raw)
            assert match, f"malformed reply line {raw!r}"
            code, separator, text = match.group(1).decode(), match.group(2), match.group(3).decode("utf-8")
            assert not lines or lines[0][:3] == code, (lines, raw)
            if code[0] in "45":
                enhanced = ENHANCED.match(text)
                assert enhanced and enhanced.group(1) == code[0], f"no RFC 3463 code of class {code[0]}: {raw!r}"
            assert not LEAKED_ERROR.search(text), f"an internal error reached the client: {raw!r}"
            lines.append(f"{code}{separator.decode()}{text}")
            if separator == b" ":
                self.last_reply = "\n".join(lines)
                return int(code), self.last_reply

    async def line(self, raw: bytes) -> tuple[int, str]:
        """Send one line and read its reply, finishing whatever state the reply opened (DATA, AUTH, TLS)."""
        await self.send(raw + b"\r\n")
        code, text = await self.reply()
        if code == 354:
            await self.send(b"Subject: opened by junk\r\n\r\nx\r\n.\r\n")
            return await self.reply()
        if code == 334:
            return await self.line(b"*")  # RFC 4954 4: cancels the exchange
        if code == 220:
            await asyncio.wait_for(self.client.writer.start_tls(insecure_client_context()), 15)
        return code, text

    async def send(self, raw: bytes) -> None:
        try:
            await self.client.send(raw)
        except (ConnectionError, ssl.SSLError):
            raise Closed(bool(GOODBYE.match(self.last_reply))) from None

    async def data(self, content: bytes) -> tuple[int, str]:
        await self.send(b"DATA\r\n")
        code, text = await self.reply()
        if code != 354:
            return code, text
        stuffed = dot_stuffed(content)
        await self.send(stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n"))
        return await self.reply()

    async def close(self) -> None:
        await self.client.close()


def dot_stuffed(content: bytes) -> bytes:
    """Only the final CRLF.CRLF may end DATA: stuff every line that starts with a dot (RFC 5321 4.5.2)."""
    stuffed = re.sub(rb"(\r\n|\n|\r)\.", rb"\1..", content)
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


# --- what a hostile client sends --------------------------------------------------------------------------

VERBS = [
    b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP", b"AUTH PLAIN",
    b"AUTH LOGIN", b"AUTH CRAM-MD5", b"BDAT", b"ETRN", b"TURN", b"XCLIENT", b"mail from:", b"Rcpt To:",
]
RELAY_TRICKS = [
    b"<victim@example.net>", b"<victim%example.net@acme.example>", b'<"victim@example.net"@acme.example>',
    b"<@acme.example:victim@example.net>", b"<victim@[192.0.2.1]>", b"<victim@[IPv6:2001:db8::1]>",
    b"<victim@example.net> NOTIFY=SUCCESS ORCPT=rfc822;x@y", b"<victim@example.net>\x00<more@example.org>",
    b"<news@acme.example\rBcc: victim@example.net>", b"<news@acme.example> SIZE=99999999999999999999",
    b"<news@acme.example> BODY=8BITMIME SMTPUTF8", b"<news@acme.example> AUTH=<>", b"<>", b"<<>>", b"<",
    b"<news@acme.example> RET=HDRS ENVID=\xff\xfe",
]
no_line_feed = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
argument = st.one_of(
    st.sampled_from(RELAY_TRICKS),
    no_line_feed,
    st.text(max_size=60).map(lambda t: t.replace("\n", "").encode("utf-8", "surrogatepass")),
    st.integers(400, 3000).map(lambda n: b"<" + b"a" * n + b"@acme.example>"),
)
junk_line = st.one_of(
    st.tuples(st.sampled_from(VERBS), argument).map(lambda pair: pair[0] + b" " + pair[1]),
    st.tuples(st.sampled_from(VERBS), argument).map(lambda pair: pair[0] + pair[1]),
    no_line_feed,
    st.integers(1000, 6000).map(lambda n: b"NOOP " + b"x" * n),  # longer than any command line
    st.just(b"\x00\x00\x00"),
    st.binary(min_size=1, max_size=40).map(lambda b: b"\xc3\x28\xa0\xa1" + b.replace(b"\n", b"")),
)
header_block = st.one_of(
    st.just(b"Content-Type: multipart/mixed; boundary=\"unterminated\r\n\r\n--unterminated\r\nContent-Type: "),
    st.just(b"Content-Type: multipart/alternative\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n"),
    st.integers(1000, 60_000).map(lambda n: b"X-Huge: " + b"h" * n + b"\r\n"),
    st.integers(10, 3000).map(lambda n: b"X-Folded: a\r\n" + b" b\r\n" * n),
    st.just(b"From: news@acme.example\r\nFrom: victim@example.net\r\n"),
    st.just(b"Bcc: victim@example.net\r\nSubject: =?utf-8?b?AAAA?=\r\n"),
    no_line_feed.map(lambda b: b + b"\r\n"),
)
junk_content = st.lists(header_block, max_size=4).map(b"".join).flatmap(
    lambda headers: st.binary(max_size=2000).map(lambda body: headers + b"\r\n" + body)
)
junk_step = st.one_of(
    junk_line.map(lambda line: ("line", line)),
    junk_content.map(lambda content: ("mail", content)),
)


async def play_junk(session: CheckedSMTP, steps: list[tuple[str, bytes]], *, sender: bytes) -> None:
    """Every step, replies checked; a junk message goes through a real MAIL/RCPT/DATA with hostile content."""
    for kind, payload in steps:
        if kind == "line":
            await session.line(payload)
        else:
            await session.line(b"MAIL FROM:<" + sender + b">")
            await session.line(b"RCPT TO:<someone@example.net>")
            await session.data(payload)


# --- submission -------------------------------------------------------------------------------------------


async def submission_after_junk(daemon: FuzzDaemon, steps) -> None:
    session = await CheckedSMTP.open(daemon.submission_port)
    try:
        await session.client.authenticated("acme", PASSWORD)
        try:
            await play_junk(session, steps, sender=b"news@acme.example")
            await session.line(b"RSET")
        except Closed as closed:
            assert closed.announced, session.last_reply
            await session.close()
            session = await CheckedSMTP.open(daemon.submission_port)
            await session.client.authenticated("acme", PASSWORD)
        assert (await session.line(b"MAIL FROM:<news@acme.example>"))[0] == 250
        for rcpt in VALID_RECIPIENTS:
            code, text = await session.line(f"RCPT TO:<{rcpt}>".encode())
            assert code == 250, text
        code, text = await session.data(VALID_MESSAGE)
        assert code == 250, text
        queue_id = re.search(r"queued as ([0-9A-Z]{16})", text).group(1)
    finally:
        await session.close()
    body = await daemon.pool.fetchval("SELECT body FROM messages WHERE queue_id = $1", queue_id)
    assert body is not None and body.endswith(VALID_MESSAGE)
    recipients = await daemon.pool.fetch(
        "SELECT r.address, r.state FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.queue_id = $1",
        queue_id,
    )
    assert sorted(tuple(r) for r in recipients) == [(rcpt, "queued") for rcpt in VALID_RECIPIENTS]


@fuzz
@given(st.lists(junk_step, max_size=8))
def test_junk_in_an_authenticated_session_never_breaks_the_next_message(fuzz_daemon, steps):
    fuzz_daemon.run(submission_after_junk(fuzz_daemon, steps))
    fuzz_daemon.assert_healthy()


async def unauthenticated_junk(daemon: FuzzDaemon, steps, use_tls: bool) -> None:
    before = await daemon.pool.fetchval("SELECT count(*) FROM messages")
    session = await CheckedSMTP.open(daemon.submission_port)
    try:
        await session.line(b"EHLO relay.test")
        if use_tls:
            await session.line(b"STARTTLS")
            await session.line(b"EHLO relay.test")
        for kind, payload in steps:
            if kind == "line":
                code, text = await session.line(payload)
            else:
                code, text = await session.line(b"MAIL FROM:<news@acme.example>")
                assert code == 530, text
                await session.line(b"RCPT TO:<victim@example.net>")
                code, text = await session.data(payload)
            assert code != 235, "authenticated by junk"
    except Closed as closed:
        assert closed.announced, session.last_reply
    finally:
        await session.close()
    assert await daemon.pool.fetchval("SELECT count(*) FROM messages") == before


@fuzz
@given(st.lists(junk_step, max_size=8), st.booleans())
def test_nothing_is_relayed_for_a_session_that_never_authenticated(fuzz_daemon, steps, use_tls):
    fuzz_daemon.run(unauthenticated_junk(fuzz_daemon, steps, use_tls))
    fuzz_daemon.assert_healthy()


# --- the feedback listener --------------------------------------------------------------------------------

FIXTURE_BYTES = [path.read_bytes() for path in sorted(FIXTURES.glob("*.eml"))]


@st.composite
def mutated_report(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(FIXTURE_BYTES)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.one_of(st.binary(max_size=40), st.sampled_from(
            [b"\x00", b"\r\n\r\n", b"\xff\xfe", b"\r\nFeedback-Type: abuse\x00junk\r\n", b"--", b"=?utf-8?b?",
             b"\r\nContent-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; \x00@x\r\n"]
        )))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        del data[at : at + draw(st.integers(0, 300))]
    return bytes(data)


async def dsn_events(daemon: FuzzDaemon) -> int:
    return await daemon.pool.fetchval(
        "SELECT count(*) FROM events WHERE recipient_id = $1 AND kind = 'dsn'", daemon.check_recipient_id
    )


async def feedback_after_junk(daemon: FuzzDaemon, steps, reports: list[bytes]) -> None:
    events_before = await dsn_events(daemon)
    session = await CheckedSMTP.open(daemon.feedback_port)
    try:
        await session.line(b"EHLO mx.remote.example")
        try:
            await play_junk(session, steps, sender=b"")
            await session.line(b"RSET")
            for report in reports:  # to a real VERP address: the parser and the store see the junk
                assert (await session.line(b"MAIL FROM:<>"))[0] == 250
                assert (await session.line(f"RCPT TO:<{daemon.verp_for_junk}>".encode()))[0] == 250
                code, text = await session.data(report)
                # 500: a line over 1000 octets (RFC 5321 4.5.3.1.6), which a bare-LF report is as a whole
                assert code == 250 or code == 552 or "Line too long" in text, text
            await session.line(b"RSET")
        except Closed as closed:
            assert closed.announced, session.last_reply
            await session.close()
            session = await CheckedSMTP.open(daemon.feedback_port)
            await session.line(b"EHLO mx.remote.example")
        assert (await session.line(b"MAIL FROM:<>"))[0] == 250
        code, text = await session.line(f"RCPT TO:<{daemon.verp_for_check}>".encode())
        assert code == 250, text
        code, text = await session.data(SOFT_BOUNCE)
        assert code == 250, text
    finally:
        await session.close()
    assert await dsn_events(daemon) == events_before + 1


@fuzz
@given(st.lists(junk_step, max_size=6), st.lists(mutated_report(), max_size=3))
def test_junk_and_broken_reports_never_stop_the_feedback_listener(fuzz_daemon, steps, reports):
    fuzz_daemon.run(feedback_after_junk(fuzz_daemon, steps, reports))
    fuzz_daemon.assert_healthy()


async def feedback_relay_attempt(daemon: FuzzDaemon, rcpt: bytes) -> tuple[int, str]:
    session = await CheckedSMTP.open(daemon.feedback_port)
    try:
        await session.line(b"EHLO mx.remote.example")
        await session.line(b"MAIL FROM:<someone@example.net>")
        return await session.line(b"RCPT TO:" + rcpt)
    finally:
        await session.close()


@pytest.mark.parametrize(
    "rcpt",
    [
        b"<victim@example.net>",
        b"<victim%example.net@" + BOUNCE_DOMAIN.encode() + b">",
        b'<"victim@example.net"@' + BOUNCE_DOMAIN.encode() + b">",
        b"<@" + BOUNCE_DOMAIN.encode() + b":victim@example.net>",
        b"<victim@[127.0.0.1]>",
        b"<fbl@" + BOUNCE_DOMAIN.encode() + b".example.net>",
        b"<b-x@" + BOUNCE_DOMAIN.encode() + b"\r\nRCPT TO:<victim@example.net>>",
    ],
    ids=["other-domain", "percent-hack", "quoted-local", "source-route", "ip-literal", "lookalike", "crlf"],
)
def test_the_feedback_listener_refuses_every_relay_trick(fuzz_daemon, rcpt):
    code, text = fuzz_daemon.run(feedback_relay_attempt(fuzz_daemon, rcpt))
    assert code in (550, 553, 501, 500) and code >= 500, text
    fuzz_daemon.assert_healthy()


async def address_that_trips_the_parser(port: int, command: bytes, *, authenticated: bool) -> tuple[int, str]:
    session = await CheckedSMTP.open(port)
    try:
        if authenticated:
            await session.client.authenticated("acme", PASSWORD)
        else:
            await session.line(b"EHLO mx.remote.example")
        if command.startswith(b"RCPT"):
            assert (await session.line(b"MAIL FROM:<news@acme.example>"))[0] == 250
        code, text = await session.line(command)
        assert (await session.line(b"NOOP"))[0] == 250
        return code, text
    finally:
        await session.close()


@pytest.mark.parametrize("command", [b"MAIL FROM:<", b"MAIL FROM:<a@", b"MAIL FROM:<@", b"RCPT TO:<", b"RCPT TO:<x@"])
@pytest.mark.parametrize("listener", ["submission", "feedback"])
def test_addresses_that_trip_the_email_parser_get_a_5xx_syntax_error(fuzz_daemon, listener, command):
    """The email package raises IndexError (not HeaderParseError) on these: it was a 451 and an error log."""
    port = fuzz_daemon.submission_port if listener == "submission" else fuzz_daemon.feedback_port
    code, text = fuzz_daemon.run(address_that_trips_the_parser(port, command, authenticated=listener == "submission"))
    assert code in (501, 553) and text[4:6] == "5.", text
    fuzz_daemon.assert_healthy()


async def tls_handshake_junk(daemon: FuzzDaemon, junk: bytes) -> None:
    """Garbage instead of a TLS handshake after STARTTLS, then a fresh connection still works."""
    session = await CheckedSMTP.open(daemon.submission_port)
    await session.line(b"EHLO client.test")
    await session.client.send(b"STARTTLS\r\n")
    assert (await session.reply())[0] == 220
    await session.client.send(junk)
    try:
        await asyncio.wait_for(session.client.reader.read(1000), 1)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    await session.close()
    await submission_after_junk(daemon, [])


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(min_size=1, max_size=300))
def test_garbage_instead_of_a_tls_handshake_harms_nobody(fuzz_daemon, junk):
    fuzz_daemon.run(tls_handshake_junk(fuzz_daemon, junk))
    fuzz_daemon.assert_healthy()


# --- relay tricks and header injection over real SMTP (the address rules themselves: tests/unit/policy) ----

RELAY_RECIPIENTS = {
    "percent-hack": b"<victim%example.net@acme.example>",
    "quoted-local": b'<"victim@example.net"@acme.example>',
    "ip-literal": b"<victim@[192.0.2.1]>",
    "ipv6-literal": b"<victim@[IPv6:2001:db8::1]>",
    "cr-inside": b"<victim@example.net\rRCPT TO:<other@example.org>>",
    "nul-inside": b"<victim@example.net\x00@acme.example>",
}


async def relay_attempt(daemon: FuzzDaemon, rcpt: bytes, authenticated: bool) -> list[tuple[int, str]]:
    before = await daemon.pool.fetchval("SELECT count(*) FROM recipients")
    session = await CheckedSMTP.open(daemon.submission_port)
    try:
        if authenticated:
            await session.client.authenticated("acme", PASSWORD)
        else:
            await session.line(b"EHLO relay.test")
        replies = [await session.line(b"MAIL FROM:<news@acme.example>"), await session.line(b"RCPT TO:" + rcpt)]
        replies.append(await session.data(VALID_MESSAGE))
    finally:
        await session.close()
    assert await daemon.pool.fetchval("SELECT count(*) FROM recipients") == before
    return replies


@pytest.mark.parametrize("rcpt", list(RELAY_RECIPIENTS.values()), ids=list(RELAY_RECIPIENTS))
@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "anonymous"])
def test_relay_tricks_are_refused_over_smtp_and_nothing_is_stored(fuzz_daemon, rcpt, authenticated):
    mail, rcpt_reply, data = fuzz_daemon.run(relay_attempt(fuzz_daemon, rcpt, authenticated))
    if authenticated:
        assert mail[0] == 250 and rcpt_reply[0] in (501, 553) and rcpt_reply[1][4:6] == "5.", rcpt_reply
    else:
        assert mail[0] == 530 and rcpt_reply[0] in (501, 503, 530, 553), rcpt_reply
    assert data[0] in (503, 554), data  # no valid recipient: DATA is refused
    fuzz_daemon.assert_healthy()


async def routed_recipient(daemon: FuzzDaemon, rcpt: bytes) -> tuple[int, list[str]]:
    session = await CheckedSMTP.open(daemon.submission_port)
    try:
        await session.client.authenticated("acme", PASSWORD)
        assert (await session.line(b"MAIL FROM:<news@acme.example>"))[0] == 250
        code, text = await session.line(b"RCPT TO:" + rcpt)
        if code != 250:
            return code, []
        code, text = await session.data(VALID_MESSAGE)
        assert code == 250, text
    finally:
        await session.close()
    queue_id = re.search(r"queued as ([0-9A-Z]{16})", text).group(1)
    rows = await daemon.pool.fetch(
        "SELECT r.address FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.queue_id = $1", queue_id
    )
    return 250, [r["address"] for r in rows]


@pytest.mark.parametrize("rcpt", [b"<@acme.example:victim@example.net>", b"<@a.example,@b.example:victim@example.net>"])
def test_a_source_route_is_refused_or_dropped_never_followed(fuzz_daemon, rcpt):
    """aiosmtpd strips the route before mtad sees the address (RFC 5321 appendix C allows ignoring it): an
    authenticated tenant may mail victim@example.net anyway, but never via the hosts the route names."""
    code, stored = fuzz_daemon.run(routed_recipient(fuzz_daemon, rcpt))
    assert code in (250, 501, 553)
    assert stored in ([], ["victim@example.net"])


INJECTIONS = [
    (b"EHLO evil\rBcc: victim@example.net", b"MAIL FROM:<news@acme.example>", b"RCPT TO:<x@example.net>"),
    (b"EHLO client.test", b"MAIL FROM:<news@acme.example> ENVID=a\rBcc: victim@x.y", b"RCPT TO:<x@example.net>"),
    (b"EHLO client.test", b"MAIL FROM:<news@acme.example>", b"RCPT TO:<x@example.net> ORCPT=rfc822;a\rBcc: victim@x.y"),
    (b"EHLO client.test", b"MAIL FROM:<news@acme.example\rBcc: victim@example.net>", b"RCPT TO:<x@example.net>"),
    (b"EHLO client.test", b"MAIL FROM:<news@acme.example>", b"RCPT TO:<x@example.net\rBcc: victim@example.net>"),
]
HOSTILE_TENANT_HEADERS = (  # the client's own headers are its business; what mtad reads from them is not
    b"X-Mtad-List: offers Bcc: victim@example.net  and more <b>\xff\x00\r\n"
    b"X-Mtad-Class: marketing\r\n"
)


async def injection_attempt(daemon: FuzzDaemon, helo: bytes, mail: bytes, rcpt: bytes) -> tuple[bytes, str] | None:
    session = await CheckedSMTP.open(daemon.submission_port)
    try:
        await session.client.authenticated("acme", PASSWORD)
        await session.line(helo)
        if (await session.line(mail))[0] != 250 or (await session.line(rcpt))[0] != 250:
            return None
        code, text = await session.data(HOSTILE_TENANT_HEADERS + VALID_MESSAGE)
        assert code == 250, text
    finally:
        await session.close()
    queue_id = re.search(r"queued as ([0-9A-Z]{16})", text).group(1)
    row = await daemon.pool.fetchrow("SELECT body, mail_from, list_id FROM messages WHERE queue_id = $1", queue_id)
    return row["body"], row["mail_from"], row["list_id"]


@pytest.mark.parametrize(("helo", "mail", "rcpt"), INJECTIONS, ids=["helo", "envid", "orcpt", "sender", "recipient"])
def test_no_header_can_be_injected_through_the_envelope_or_tenant_headers(fuzz_daemon, helo, mail, rcpt):
    stored = fuzz_daemon.run(injection_attempt(fuzz_daemon, helo, mail, rcpt))
    if stored is not None:  # the command was accepted: what it carried must not have become a header
        body, mail_from, list_id = stored
        header_block = body.split(b"\r\n\r\n", 1)[0]
        lines = re.split(rb"\r\n|\r|\n", header_block)
        assert not [line for line in lines if line.lower().startswith(b"bcc")], header_block
        assert b"\r" not in header_block.replace(b"\r\n", b"")
        assert mail_from == "news@acme.example"
        assert re.fullmatch(r"[a-z0-9._@+-]{1,200}", list_id), list_id  # reduced to safe characters
    fuzz_daemon.assert_healthy()

"""Submission over real SMTP on loopback into a real PostgreSQL: what is accepted, what is refused, and why."""

from __future__ import annotations

import asyncio
import re

import aiosmtplib
import pytest

from support.daemon import PASSWORD, ports_of
from support.smtp_client import RawSMTP, insecure_client_context

MESSAGE = (
    b"From: Acme News <news@acme.example>\r\n"
    b"To: someone@example.net\r\n"
    b"Subject: November offers\r\n"
    b"\r\n"
    b"Hello,\r\nthis is the body.\r\n"
)


async def stored_messages(pool) -> list[dict]:
    return [dict(r) for r in await pool.fetch("SELECT id, queue_id, mail_from, body FROM messages ORDER BY id")]


async def recipients_of(pool, queue_id: str) -> list[tuple[str, str, str]]:
    rows = await pool.fetch(
        "SELECT r.address, r.domain, r.state FROM recipients r JOIN messages m ON m.id = r.message_id "
        "WHERE m.queue_id = $1 ORDER BY r.address",
        queue_id,
    )
    return [tuple(r) for r in rows]


async def test_starttls_auth_submission_is_stored_with_every_recipient_and_the_reply_names_the_queue_id(daemon, pool):
    port, _ = ports_of(daemon)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, validate_certs=False, timeout=15)
    await client.connect()
    await client.starttls()
    await client.login("acme", PASSWORD)
    rcpts = ["a@example.net", "b@example.org", "c@example.net"]
    errors, reply = await client.sendmail("news@acme.example", rcpts, MESSAGE)
    await client.quit()
    assert errors == {}
    match = re.fullmatch(r"2\.0\.0 Ok: queued as ([0-9A-Z]{16})", reply)
    assert match, reply
    (message,) = await stored_messages(pool)
    assert message["queue_id"] == match.group(1)
    assert message["mail_from"] == "news@acme.example"
    assert await recipients_of(pool, match.group(1)) == [
        ("a@example.net", "example.net", "queued"),
        ("b@example.org", "example.org", "queued"),
        ("c@example.net", "example.net", "queued"),
    ]
    body = message["body"]
    assert body.startswith(b"Received: from ")
    assert f"with ESMTPSA id {match.group(1)};".encode() in body
    assert body.endswith(MESSAGE)
    assert b"Message-ID: <" + match.group(1).encode() + b"@mtad.test>" in body


async def test_auth_is_not_offered_before_starttls_and_is_refused_if_tried(daemon):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    code, ehlo = await client.command("EHLO client.test")
    assert code == 250 and "STARTTLS" in ehlo and "AUTH" not in ehlo
    code, text = await client.login("acme", PASSWORD)
    assert code == 538 and "5.7.11" in text
    await client.starttls()
    code, ehlo = await client.command("EHLO client.test")
    assert "AUTH LOGIN PLAIN" in ehlo
    await client.close()


async def test_mail_without_auth_is_refused_and_nothing_is_relayed(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.command("EHLO client.test")
    await client.starttls()
    await client.command("EHLO client.test")
    code, text = await client.command("MAIL FROM:<news@acme.example>")
    assert (code, text[4:9]) == (530, "5.7.0")
    code, text = await client.command("RCPT TO:<victim@example.net>")
    assert code == 503 or text[4:9] == "5.7.0"
    await client.close()
    assert await stored_messages(pool) == []


async def test_wrong_password_gets_535_and_then_the_client_is_throttled(daemon):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.command("EHLO client.test")
    await client.starttls()
    await client.command("EHLO client.test")
    for _ in range(3):  # max_failed_logins = 3 in this fixture
        code, text = await client.login("acme", "not the password")
        assert (code, text[4:9]) == (535, "5.7.8")
    code, text = await client.login("acme", PASSWORD)  # even the right password waits out the window
    assert (code, text[4:9]) == (454, "4.7.0")
    await client.close()


async def test_unknown_login_gets_the_same_535_as_a_wrong_password(daemon):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.command("EHLO client.test")
    await client.starttls()
    await client.command("EHLO client.test")
    code, text = await client.login("nobody", PASSWORD)
    assert (code, text[4:9]) == (535, "5.7.8")
    await client.close()


@pytest.mark.parametrize(
    ("mail_from", "from_header", "expected"),
    [
        ("news@globex.example", b"news@acme.example", (553, "5.7.1")),  # envelope sender of another tenant
        ("news@acme.example", b"news@globex.example", (550, "5.7.1")),  # From header of another tenant
        ("news@acme.example", None, (550, "5.6.0")),  # no From at all
    ],
)
async def test_a_tenant_cannot_send_as_another_tenants_domain(daemon, pool, mail_from, from_header, expected):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    code, text = await client.command(f"MAIL FROM:<{mail_from}>")
    if code == 250:
        assert (await client.command("RCPT TO:<someone@example.net>"))[0] == 250
        assert (await client.command("DATA"))[0] == 354
        header = b"From: " + from_header + b"\r\n" if from_header else b""
        code, text = await client.command(header + b"Subject: hi\r\n\r\nbody\r\n.")
    assert (code, text[4:9]) == expected
    await client.close()
    assert await stored_messages(pool) == []


async def test_implicit_tls_listener_offers_auth_and_accepts_mail(daemon, pool):
    _, tls_port = ports_of(daemon)
    client, _ = await RawSMTP.open(tls_port, implicit_tls=True)
    code, ehlo = await client.command("EHLO client.test")
    assert "AUTH LOGIN PLAIN" in ehlo and "STARTTLS" not in ehlo
    assert (await client.login("acme", PASSWORD))[0] == 235
    assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250
    assert (await client.command("RCPT TO:<x@example.net>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    code, text = await client.command(MESSAGE + b".")
    assert code == 250, text
    await client.close()
    assert len(await stored_messages(pool)) == 1


async def test_auth_login_mechanism_works(daemon):
    port, _ = ports_of(daemon)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, validate_certs=False, timeout=15)
    await client.connect()
    await client.starttls()
    await client.ehlo()
    response = await client.auth_login("acme", PASSWORD)
    assert response.code == 235
    await client.quit()


SMUGGLING_SEQUENCES = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r\n.\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("sequence", SMUGGLING_SEQUENCES, ids=repr)
async def test_smuggling_sequences_never_split_one_data_into_two_messages(daemon, pool, sequence):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250
    assert (await client.command("RCPT TO:<first@example.net>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    smuggled = (
        b"MAIL FROM:<news@acme.example>\r\nRCPT TO:<smuggled@example.org>\r\nDATA\r\n"
        b"From: news@acme.example\r\n\r\nsmuggled body\r\n"
    )
    await client.send(b"From: news@acme.example\r\nSubject: one\r\n\r\nfirst body" + sequence + smuggled + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    code, text = await client.command("NOOP")
    assert code == 250, text  # the next reply belongs to our NOOP: no second transaction was answered
    await client.close()
    messages = await stored_messages(pool)
    assert len(messages) == 1
    assert b"smuggled body" in messages[0]["body"]
    assert await recipients_of(pool, messages[0]["queue_id"]) == [("first@example.net", "example.net", "queued")]


async def test_bare_line_endings_are_stored_as_crlf(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    await client.command("MAIL FROM:<news@acme.example>")
    await client.command("RCPT TO:<x@example.net>")
    await client.command("DATA")
    await client.send(b"From: news@acme.example\r\nSubject: s\r\n\r\nline one\nline two\rline three\r\n.\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    (message,) = await stored_messages(pool)
    assert message["body"].endswith(b"\r\nline one\r\nline two\r\nline three\r\n")


async def test_size_is_advertised_and_oversized_mail_gets_552(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    code, ehlo = await client.command("EHLO again.test")
    assert "SIZE 65536" in ehlo
    code, text = await client.command("MAIL FROM:<news@acme.example> SIZE=100000")
    assert code == 552 and "5.3.4" in text
    await client.command("MAIL FROM:<news@acme.example>")
    await client.command("RCPT TO:<x@example.net>")
    await client.command("DATA")
    code, text = await client.command(b"From: news@acme.example\r\n\r\n" + b"x" * 900 + b"\r\n" * 80 + b"y" * 70000 + b"\r\n.")
    assert code in (500, 552) and re.search(r" 5\.\d\.\d ", text + " "), text
    code, _ = await client.command("NOOP")
    assert code == 250  # the connection survives and can go on
    await client.close()
    assert await stored_messages(pool) == []


async def test_recipients_beyond_the_limit_get_452_and_the_rest_is_stored(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    await client.command("MAIL FROM:<news@acme.example>")
    replies = [await client.command(f"RCPT TO:<r{n}@example.net>") for n in range(7)]  # limit is 5
    assert [code for code, _ in replies] == [250] * 5 + [452, 452]
    assert "4.5.3" in replies[5][1]
    await client.command("DATA")
    code, text = await client.command(MESSAGE + b".")
    assert code == 250
    await client.close()
    (message,) = await stored_messages(pool)
    assert len(await recipients_of(pool, message["queue_id"])) == 5


async def test_bad_input_gets_replies_with_enhanced_codes_and_the_session_goes_on(daemon):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    for command in ("DATA", "RCPT TO:<x@example.net>", "MAIL FROM:<not an address>", "BOGUS", "MAIL FROM:<%s>" % ("x" * 2000)):
        code, text = await client.command(command)
        assert 500 <= code < 600 and re.match(r"^\d{3}[ -]5\.\d{1,3}\.\d{1,3} ", text), (command, text)
    assert (await client.command("NOOP"))[0] == 250
    await client.close()


async def test_every_reply_but_the_greeting_and_ehlo_carries_an_enhanced_code_as_advertised(daemon):
    # RFC 2034: a server that offers ENHANCEDSTATUSCODES puts one in every reply except the greeting and the
    # replies to HELO and EHLO (aiosmtpd's own "250 OK", "221 Bye" … included).
    port, _ = ports_of(daemon)
    client, greeting = await RawSMTP.open(port)
    code, ehlo = await client.command("EHLO client.test")
    assert code == 250 and "250-ENHANCEDSTATUSCODES" in ehlo.splitlines()
    replies = []
    for command in ("NOOP", "RSET", "HELP", "HELP DATA", "VRFY <someone@example.net>", "STARTTLS"):
        replies.append((command, *await client.command(command)))
    await asyncio.wait_for(client.writer.start_tls(insecure_client_context()), 15)
    await client.command("EHLO client.test")
    replies.append(("AUTH", *await client.login("acme", PASSWORD)))
    for command in ("MAIL FROM:<news@acme.example>", "RCPT TO:<r@example.net>", "DATA", MESSAGE + b".",
                    "RSET", "BOGUS", "QUIT"):
        replies.append((command, *await client.command(command)))
    await client.close()
    for command, code, text in replies:
        if code == 354:
            continue  # a continuation, not a reply that ends a command (RFC 2034 section 3)
        for line in text.splitlines():
            assert re.match(rf"^{code}[ -][245]\.\d{{1,3}}\.\d{{1,3}} ", line), (command, line)
            assert line[4] == str(code)[0], (command, line)  # the class of the code and of the enhanced code agree


async def test_utf8_addresses_are_accepted_with_smtputf8(daemon, pool):
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.authenticated("acme", PASSWORD)
    assert (await client.command("MAIL FROM:<news@acme.example> SMTPUTF8"))[0] == 250
    assert (await client.command("RCPT TO:<jörg@bücher.example>".encode()))[0] == 250
    await client.command("DATA")
    assert (await client.command(MESSAGE + b"."))[0] == 250
    await client.close()
    (message,) = await stored_messages(pool)
    assert await recipients_of(pool, message["queue_id"]) == [("jörg@bücher.example", "xn--bcher-kva.example", "queued")]


async def test_a_client_over_its_connection_limit_gets_421_and_others_are_unaffected(db_url, tenants, tmp_path):
    from support.daemon import start_in_process

    daemon = await start_in_process(db_url, tmp_path, max_connections_per_client=2)
    try:
        port, _ = ports_of(daemon)
        first, _ = await RawSMTP.open(port)
        second, _ = await RawSMTP.open(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.readline(), 10)
        assert refused.startswith(b"421 4.7.0")
        writer.close()
        await first.close()  # a slot frees up when a connection ends
        await asyncio.sleep(0.2)
        third, _ = await RawSMTP.open(port)
        assert (await third.command("NOOP"))[0] == 250
        await second.close()
        await third.close()
    finally:
        await daemon.stop()


async def test_submission_answers_452_while_the_queue_is_over_its_limit(db_url, tenants, pool, tmp_path):
    from support.daemon import daemon_document

    from mtad.app import Daemon
    from mtad.config import parse_settings

    document = daemon_document(db_url, tmp_path, max_queue_recipients=2)
    document["queue"]["gauge_interval"] = "100ms"
    daemon = Daemon(parse_settings(document, {}), None)
    await daemon.start()
    try:
        port, _ = ports_of(daemon)
        client, _ = await RawSMTP.open(port)
        await client.authenticated("acme", PASSWORD)
        for rcpt in ("a@example.net", "b@example.net"):
            assert (await client.command("MAIL FROM:<news@acme.example>"))[0] == 250
            await client.command(f"RCPT TO:<{rcpt}>")
            await client.command("DATA")
            assert (await client.command(MESSAGE + b"."))[0] == 250
        for _ in range(50):
            code, text = await client.command("MAIL FROM:<news@acme.example>")
            if code != 250:
                break
            await client.command("RSET")
            await asyncio.sleep(0.1)
        assert (code, text[4:9]) == (452, "4.3.1")
        await client.close()
    finally:
        await daemon.stop()

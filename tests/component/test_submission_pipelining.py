"""PIPELINING (RFC 2920) on the submission listener, and submission from a trusted network without AUTH.

The client side is a raw socket, so the tests see what crosses the wire: which replies come, in which order, and
which of them come in one write; swaks is an independent pipelining client."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from support.daemon import PASSWORD, ports_of, start_in_process
from support.smtp_client import RawSMTP, insecure_client_context

MESSAGE = b"From: Acme News <news@acme.example>\r\nTo: someone@example.net\r\nSubject: pipelined\r\n\r\nHello.\r\n"
TRUSTED = [{"network": "127.0.0.1/32", "tenant": "acme"}]  # 127.0.0.2 and beyond are not trusted


@pytest.fixture
async def daemon(db_url, tenants, tmp_path):
    running = await start_in_process(db_url, tmp_path, max_recipients=5, trusted_networks=TRUSTED)
    yield running
    await running.stop()


async def open_plain(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 15)
    greeting = await asyncio.wait_for(reader.readline(), 15)
    assert greeting.startswith(b"220 "), greeting
    return reader, writer


async def replies(reader: asyncio.StreamReader, count: int) -> list[str]:
    """The next `count` replies, each as its last line (multi-line replies folded)."""
    lines = []
    while len(lines) < count:
        line = (await asyncio.wait_for(reader.readline(), 15)).decode().rstrip("\r\n")
        assert line, f"connection closed after {lines}"
        if line[3:4] != "-":
            lines.append(line)
    return lines


async def stored(pool) -> list[tuple[str, list[str]]]:
    rows = await pool.fetch(
        "SELECT t.name, array_agg(r.address ORDER BY r.address) AS addresses FROM messages m"
        " JOIN tenants t ON t.id = m.tenant_id JOIN recipients r ON r.message_id = m.id GROUP BY m.id, t.name"
        " ORDER BY m.id"
    )
    return [(r["name"], list(r["addresses"])) for r in rows]


def record_writes(daemon) -> list[bytes]:
    """Every write of the daemon's one open submission session to its socket, from now on."""
    [session] = daemon.listeners.sessions
    writes: list[bytes] = []
    write = session.transport.write

    def recorded(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    session.transport.write = recorded
    return writes


async def test_a_pipelined_group_is_answered_in_order_in_one_write_and_the_message_is_stored(daemon, pool):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writes = record_writes(daemon)
    writer.write(b"EHLO client.test\r\n")
    ehlo = (await replies(reader, 1))[0]
    assert len(writes) == 1 and b"\r\n250-PIPELINING\r\n" in writes[0], writes  # all its lines in one write

    writer.write(
        b"MAIL FROM:<news@acme.example>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<not an address>\r\nDATA\r\n"
    )
    answered = await replies(reader, 5)
    assert [line[:9] for line in answered] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "553 5.1.3", "354 End d"]
    assert len(writes) == 2, writes  # the group's five replies in one write
    writer.write(MESSAGE + b".\r\n")
    [queued] = await replies(reader, 1)
    assert queued.startswith("250 2.0.0 Ok: queued as "), queued
    writer.write(b"QUIT\r\n")
    assert (await replies(reader, 1))[0].startswith("221")
    writer.close()
    assert ehlo == "250 HELP"
    # Trusted network: stored for its tenant without AUTH.
    assert await stored(pool) == [("acme", ["a@example.net", "b@example.org"])]


async def test_replies_are_not_held_for_a_client_that_waits_for_each(daemon):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writes = record_writes(daemon)
    for command in (b"EHLO client.test", b"MAIL FROM:<news@acme.example>", b"RCPT TO:<a@example.net>", b"RSET"):
        writer.write(command + b"\r\n")
        assert (await replies(reader, 1))[0][:3] == "250"
    assert len(writes) == 4
    writer.close()


async def test_data_after_every_recipient_was_refused_gets_554_and_the_session_goes_on(daemon, pool):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writer.write(b"EHLO client.test\r\n")
    await replies(reader, 1)
    writer.write(b"MAIL FROM:<news@acme.example>\r\nRCPT TO:<x@@example.net>\r\nRCPT TO:<>\r\nDATA\r\n")
    answered = await replies(reader, 4)
    assert answered[0].startswith("250 ") and answered[3].startswith("554 5.5.1 "), answered
    assert all(line[0] == "5" for line in answered[1:3]), answered
    # The client sends no content after a refused DATA: the next commands are commands.
    writer.write(b"RSET\r\nMAIL FROM:<news@acme.example>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
    assert [line[:3] for line in await replies(reader, 4)] == ["250", "250", "250", "354"]
    writer.write(MESSAGE + b".\r\n")
    assert (await replies(reader, 1))[0].startswith("250 2.0.0 ")
    writer.close()
    assert await stored(pool) == [("acme", ["c@example.net"])]


async def test_data_without_any_rcpt_is_still_503(daemon):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writer.write(b"EHLO client.test\r\nMAIL FROM:<news@acme.example>\r\nDATA\r\n")
    assert [line[:9] for line in await replies(reader, 3)] == ["250 HELP", "250 2.1.0", "503 5.5.1"]
    writer.close()


@pytest.mark.parametrize("last", [b"NOOP", b"QUIT", b"BOGUS"])
async def test_held_replies_go_out_before_the_reply_to_a_command_that_ends_the_group(daemon, last):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writer.write(b"EHLO client.test\r\nMAIL FROM:<news@acme.example>\r\nRCPT TO:<a@example.net>\r\nRSET\r\n" + last + b"\r\n")
    answered = await replies(reader, 5)
    assert [line[:3] for line in answered[:4]] == ["250"] * 4, answered
    assert answered[4][:3] == {b"NOOP": "250", b"QUIT": "221", b"BOGUS": "500"}[last], answered
    if last == b"QUIT":  # the 221 was written before the connection closed
        assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()


async def test_commands_pipelined_behind_starttls_in_plaintext_are_discarded(daemon):
    # CVE-2011-0411's class: a man in the middle appends a command to the client's STARTTLS; it must not run
    # inside the encrypted session.
    port, _ = ports_of(daemon)
    client, _ = await RawSMTP.open(port)
    await client.command("EHLO client.test")
    await client.send(b"STARTTLS\r\nBOGUS injected\r\n")
    code, text = await client.reply()
    assert code == 220, text
    await asyncio.wait_for(client.writer.start_tls(insecure_client_context()), 15)
    code, text = await client.command("NOOP")
    assert code == 250, text  # the reply to our NOOP, not a 500 for the injected line
    await client.close()


async def test_an_untrusted_address_must_authenticate(daemon, pool):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port, source="127.0.0.2")
    writer.write(b"EHLO client.test\r\nMAIL FROM:<news@acme.example>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
    answered = await replies(reader, 4)
    assert answered[1].startswith("530 5.7.0 "), answered
    assert all(line[0] == "5" for line in answered[2:]), answered
    writer.close()
    assert await stored(pool) == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by make setup")
async def test_swaks_pipelining_over_starttls_and_auth_queues_a_message(daemon, pool):
    port, _ = ports_of(daemon)
    result = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--pipeline", "--auth", "PLAIN", "--auth-user", "globex",
         "--auth-password", PASSWORD, "--from", "news@globex.example", "--h-From", "news@globex.example",
         "--to", "x@example.net,y@example.org"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "queued as" in result.stdout
    assert await stored(pool) == [("globex", ["x@example.net", "y@example.org"])]


async def test_help_still_lists_the_commands_mtad_overrides(daemon):
    port, _ = ports_of(daemon)
    reader, writer = await open_plain(port)
    writer.write(b"EHLO client.test\r\nHELP\r\nHELP MAIL\r\n")
    _, listed, mail = await replies(reader, 3)
    assert {"DATA", "MAIL", "RCPT", "RSET", "NOOP", "QUIT"} <= set(listed.split(": ", 1)[1].split()), listed
    assert mail.startswith("250 2.0.0 Syntax: MAIL FROM: <address>"), mail
    writer.close()

"""The submission listener's DATA reader (blocks, not lines) over real loopback TCP.

SubmissionSMTP with a recording handler: what arrives split at every byte, dot-stuffed, oversized, with an
overlong line, or followed at once by the next command must come out exactly as aiosmtpd's line reader gave it.
"""

from __future__ import annotations

import asyncio

import pytest

from mtad.ingest.protocol import SubmissionSMTP


class Recorder:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.contents.append(envelope.original_content)
        return "250 2.0.0 Ok: queued"


@pytest.fixture
async def listener():
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SubmissionSMTP(recorder, registry=set(), hostname="mtad.test", data_size_limit=2000),
        "127.0.0.1",
        0,
    )
    yield server.sockets[0].getsockname()[1], recorder
    server.close()
    await server.wait_closed()


async def converse(port: int, chunks: list[bytes], replies: int) -> list[bytes]:
    """Send the chunks (each its own write, a pause between), then read `replies` reply lines after the greeting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()  # 220
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.002)
    lines = [await asyncio.wait_for(reader.readline(), 5) for _ in range(replies)]
    writer.close()
    return [line[:3] for line in lines]


ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
EHLO_LINES = 4  # 250-mtad.test, 250-SIZE, 250-8BITMIME, 250 HELP: aiosmtpd's EHLO reply here


async def test_a_message_and_the_next_command_in_one_write_are_told_apart(listener):
    port, recorder = listener
    wire = ENVELOPE + b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    replies = await converse(port, [wire], EHLO_LINES + 5)
    assert replies[EHLO_LINES:] == [b"250", b"250", b"354", b"250", b"221"]
    assert recorder.contents == [b"Subject: x\r\n\r\nhello\r\n"]


async def test_dot_stuffed_lines_split_at_every_byte_come_out_unstuffed(listener):
    port, recorder = listener
    body = b"..leading dot\r\nmiddle\r\n...two dots\r\n.\r\n"
    replies = await converse(port, [ENVELOPE] + [bytes([b]) for b in body] + [b"QUIT\r\n"], EHLO_LINES + 5)
    assert replies[EHLO_LINES:] == [b"250", b"250", b"354", b"250", b"221"]
    assert recorder.contents == [b".leading dot\r\nmiddle\r\n..two dots\r\n"]


async def test_an_empty_message_is_an_empty_message(listener):
    port, recorder = listener
    await converse(port, [ENVELOPE, b".\r\nQUIT\r\n"], EHLO_LINES + 5)
    assert recorder.contents == [b""]


async def test_too_much_data_is_552_after_the_end_and_the_session_goes_on(listener):
    port, recorder = listener
    big = b"x" * 70 + b"\r\n"
    chunks = [ENVELOPE] + [big * 10] * 5 + [b"\r", b"\n.", b"\r\n"]  # 3,600 octets, the end split in three
    chunks.append(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nsmall\r\n.\r\nQUIT\r\n")
    replies = await converse(port, chunks, EHLO_LINES + 8)
    assert replies[EHLO_LINES:] == [b"250", b"250", b"354", b"552", b"250", b"250", b"354", b"250"]
    assert recorder.contents == [b"small\r\n"]


async def test_a_line_over_the_rfc_limit_is_refused(listener):
    port, recorder = listener
    replies = await converse(port, [ENVELOPE, b"y" * 1000 + b"\r\n.\r\n"], EHLO_LINES + 4)
    assert replies[EHLO_LINES:] == [b"250", b"250", b"354", b"500"]
    assert recorder.contents == []

"""benchmarks/lean_smtp.py: the lean sink and injector of the relay benchmark speak SMTP correctly.

The sink is driven by aiosmtplib (what mtad delivers with) and by raw pipelined bytes cut at awkward places;
the injector is driven against aiosmtpd (a real SMTP server library) and against a server that checks it
never pipelines. What the sink records is what benchmarks/relay.py computes latency and DKIM coverage from.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdServer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lean_smtp  # noqa: E402


def message(index: int, sent: float, *, dkim: int = 0, body: bytes = b"Hello.\r\n") -> bytes:
    return (b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=bench.example; b=x\r\n" for _ in range(dkim))
            + f"From: news@bench.example\r\nTo: reader{index}@rcpt.example\r\nSubject: #{index}\r\n"
              f"X-Bench-Id: {index}\r\nX-Bench-Sent: {sent:.6f}\r\n\r\n".encode() + body)


@pytest.fixture
def sink(tmp_path: Path):
    sink = lean_smtp.LeanSink(tmp_path, max_seconds=120)
    try:
        yield sink
    finally:
        sink.stop()


async def until(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- the sink ---------------------------------------------------------------------------------------

async def test_sink_takes_mail_from_aiosmtplib(sink) -> None:
    dotted = b"Line one\r\n.starts with a dot\r\n..two dots\r\n.\r\n"  # "." alone as a line, inside the body
    sent_stamps = [time.time() - 0.5, time.time() - 0.25, time.time()]
    messages = [message(1, sent_stamps[0], dkim=1), message(2, sent_stamps[1], dkim=2, body=dotted),
                message(3, sent_stamps[2])]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False,
                               local_hostname="client.test") as smtp:
        assert (await smtp.ehlo()).code == 250
        for extension in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"):
            assert smtp.supports_extension(extension), extension
        replies = []
        replies.append(await smtp.sendmail("news@bench.example", ["Reader1@Rcpt.Example"], messages[0]))
        replies.append(await smtp.sendmail("news@bench.example", ["a@rcpt.example", "b@rcpt.example"], messages[1]))
        replies.append(await smtp.sendmail("news@bench.example", ["c@rcpt.example"], messages[2]))
        assert (await smtp.noop()).code == 250
        assert (await smtp.rset()).code == 250
        assert (await smtp.execute_command(b"VRFY", b"someone")).code == 502
    for errors, reply in replies:
        assert errors == {} and reply.startswith("2.0.0 Ok: queued")
    await until(lambda: sink.received()[0] == 4)
    received = sink.stop()
    assert received["transactions"] == 3
    assert received["rcpts"] == ["reader1@rcpt.example", "a@rcpt.example", "b@rcpt.example", "c@rcpt.example"]
    assert received["ids"] == [1, 2, 2, 3]
    assert received["sent"] == [round(s, 6) for s in (sent_stamps[0], sent_stamps[1], sent_stamps[1], sent_stamps[2])]
    assert received["dkim"] == [1, 2, 2, 0]
    assert all(mail_at <= arrival for mail_at, arrival in zip(received["mail_at"], received["arrivals"]))
    assert received["unsub_urls"] == [None] * 4 and received["one_click"] == [False] * 4
    # the content is restored exactly, dot-stuffing undone
    assert [base64.b64decode(sample) for sample in received["samples"]] == messages


class RawClient:
    """A socket client that writes bytes as given and reads whatever the server answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "RawClient":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, *chunks: bytes) -> None:
        """Each chunk on its own, with a pause, so that the server reads it separately."""
        for chunk in chunks:
            self.writer.write(chunk)
            await self.writer.drain()
            await asyncio.sleep(0.03)

    async def replies_until_closed(self) -> list[bytes]:
        data = await asyncio.wait_for(self.reader.read(-1), 10)
        self.writer.close()
        return data.split(b"\r\n")[:-1]


def final_codes(lines: list[bytes]) -> list[int]:
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


async def test_sink_handles_pipelined_input_cut_anywhere(sink) -> None:
    # on the wire, dot-stuffed: "..hidden dot" is ".hidden dot", ".." alone is "."
    first = message(10, 1000.25, dkim=2, body=b"..hidden dot\r\nplain\r\n..\r\n")
    second = message(11, 1000.5)
    after_first_dot = first.index(b"\r\n..hidden") + 3
    client = await RawClient.connect(sink.port)
    await client.send(
        b"EH", b"LO client.test\r\nRCPT TO:<early@rcpt.example>\r\nVRFY x\r\n",  # RCPT before MAIL: 503
        b"MAIL FROM:<news@bench.example>\r\nRCPT TO:<x@rcpt.example>\r\nDA", b"TA\r\n",
        # the body in pieces: a stuffed line cut between its two dots, the last CRLF cut between CR and LF,
        # the lone dot cut from its CRLF
        first[:after_first_dot], first[after_first_dot:-1], first[-1:] + b".", b"\r\n",
        # a whole second transaction in one write, the next command right after the end of data
        b"RSET\r\nMAIL FROM:<news@bench.example>\r\nRCPT TO:<y@rcpt.example>\r\nDATA\r\n" + second
        + b".\r\nNOOP\r\nQU", b"IT\r\nNOOP\r\n")  # after QUIT nothing is answered
    lines = await client.replies_until_closed()
    assert final_codes(lines) == [220, 250, 503, 502, 250, 250, 354, 250, 250, 250, 250, 354, 250, 250, 221]
    assert b"250-PIPELINING" in lines and b"250 SMTPUTF8" in lines
    received = sink.stop()
    assert received["transactions"] == 2 and received["ids"] == [10, 11] and received["sent"] == [1000.25, 1000.5]
    assert received["dkim"] == [2, 0] and received["rcpts"] == ["x@rcpt.example", "y@rcpt.example"]
    restored = base64.b64decode(received["samples"][0])
    assert restored.endswith(b"\r\n.hidden dot\r\nplain\r\n.\r\n")
    assert restored == message(10, 1000.25, dkim=2, body=b".hidden dot\r\nplain\r\n.\r\n")
    assert base64.b64decode(received["samples"][1]) == second


class RecordingTransport(asyncio.Transport):
    """Collects what a protocol writes, one entry per write() call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


SESSION = (b"EHLO client.test\r\nMAIL FROM:<news@bench.example>\r\nRCPT TO:<a@rcpt.example>\r\n"
           b"RCPT TO:<b@rcpt.example>\r\nDATA\r\n" + message(5, 1234.5, dkim=1, body=b"..x\r\n..\r\ny\r\n")
           + b".\r\nMAIL FROM:<news@bench.example>\r\nRCPT TO:<c@rcpt.example>\r\nDATA\r\n.\r\nQUIT\r\n")
SESSION_CODES = [220, 250, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]


def feed(chunks: list[bytes]) -> tuple[RecordingTransport, lean_smtp.SinkRecords]:
    records = lean_smtp.SinkRecords(samples=5)
    session, transport = lean_smtp.SinkSession(records), RecordingTransport()
    session.connection_made(transport)
    for chunk in chunks:
        session.data_received(chunk)
    return transport, records


def test_sink_session_gives_the_same_result_however_the_input_is_cut() -> None:
    whole, whole_records = feed([SESSION])
    assert final_codes(b"".join(whole.writes).split(b"\r\n")[:-1]) == SESSION_CODES
    assert len(whole.writes) == 2  # the greeting, then every reply to the one read in one write
    assert whole.closing
    assert whole_records.ids == [5, 5, None] and whole_records.dkim == [1, 1, 0]
    assert base64.b64decode(whole_records.samples[0]).endswith(b"\r\n\r\n.x\r\n.\r\ny\r\n")
    assert base64.b64decode(whole_records.samples[1]) == b""  # "DATA" then "." at once: an empty message
    expected = b"".join(whole.writes)
    cuts = [[SESSION[:i], SESSION[i:]] for i in range(1, len(SESSION))]
    cuts.append([SESSION[i:i + 1] for i in range(len(SESSION))])  # one byte per read
    cuts.append([SESSION[i:i + 7] for i in range(0, len(SESSION), 7)])
    for chunks in cuts:
        transport, records = feed(chunks)
        assert b"".join(transport.writes) == expected, [len(c) for c in chunks][:3]
        assert records.samples == whole_records.samples and records.rcpts == whole_records.rcpts
        assert records.transactions == 2
        assert len(transport.writes) <= len(chunks) + 1  # never more than one write per read


# -- the injector -----------------------------------------------------------------------------------

class RecordingHandler:
    """aiosmtpd handler: keeps every message with the time its MAIL arrived; refuses or stalls on request."""

    def __init__(self, refuse: set[str] = frozenset(), stall_ids: set[int] = frozenset(), stall_s: float = 0):
        self.refuse, self.stall_ids, self.stall_s = refuse, stall_ids, stall_s
        self.messages: list[tuple[float, list[str], bytes]] = []
        self.quits = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_at = time.time()
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content
        if any(f"X-Bench-Id: {i}\r\n".encode() in content for i in self.stall_ids):
            await asyncio.sleep(self.stall_s)
        self.messages.append((envelope.mail_at, list(envelope.rcpt_tos), content))
        return "250 2.0.0 Ok: queued"

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        return "221 Bye"


class PipeliningHandler(RecordingHandler):
    """The same, offering PIPELINING (aiosmtpd reads commands in order, so it copes with pipelined input)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


async def aiosmtpd_server(handler: RecordingHandler) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AiosmtpdServer(handler, hostname="aiosmtpd.test"), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def workload(count: int) -> list[tuple[str, str, lean_smtp.MessageProducer]]:
    # every third message has lines that must be dot-stuffed on the wire
    return [("news@bench.example", f"reader{i}@rcpt.example",
             lambda sent, i=i: message(i, sent, body=b".dot\r\n..two\r\n.\r\nend\r\n" if i % 3 == 0 else b"x\r\n"))
            for i in range(count)]


@pytest.mark.parametrize("handler_class, pipelining", [(RecordingHandler, False), (PipeliningHandler, True),
                                                     (RecordingHandler, True)], ids=["lockstep", "pipelined", "not-offered"])
async def test_injector_delivers_every_message_intact_to_aiosmtpd(handler_class, pipelining) -> None:
    handler = handler_class()
    server, port = await aiosmtpd_server(handler)
    connected_at: list[float] = []
    result = lean_smtp.Injection()
    try:
        await lean_smtp.inject(port, workload(60), 4, result, lambda: connected_at.append(time.time()),
                               time_limit=30, pipelining=pipelining)
    finally:
        server.close()
    assert result.accepted == 60 and result.refused == {} and not result.timed_out
    assert result.pipelined == (60 if handler_class is PipeliningHandler else 0)
    assert len(result.accepted_at) == 60 and result.elapsed > 0
    assert len(connected_at) == 1 and connected_at[0] <= result.first_sent
    assert handler.quits == 4  # every session ended with QUIT
    by_id = {}
    for mail_at, rcpts, content in handler.messages:
        index = int(content.split(b"X-Bench-Id: ")[1].split(b"\r\n")[0])
        sent = float(content.split(b"X-Bench-Sent: ")[1].split(b"\r\n")[0])
        assert rcpts == [f"reader{index}@rcpt.example"]
        assert content == message(index, sent, body=b".dot\r\n..two\r\n.\r\nend\r\n" if index % 3 == 0 else b"x\r\n")
        assert connected_at[0] <= sent <= mail_at  # stamped just before MAIL, after the clock started
        by_id[index] = content
    assert sorted(by_id) == list(range(60))


@pytest.mark.parametrize("handler_class, pipelining", [(RecordingHandler, False), (PipeliningHandler, True)],
                         ids=["lockstep", "pipelined"])
async def test_injector_counts_refusals_and_replaces_a_silent_session(handler_class, pipelining) -> None:
    handler = handler_class(refuse={"reader3@rcpt.example", "reader7@rcpt.example"}, stall_ids={5}, stall_s=2)
    server, port = await aiosmtpd_server(handler)
    result = lean_smtp.Injection()
    try:
        await lean_smtp.inject(port, workload(20), 2, result, time_limit=30, reply_timeout_s=0.5,
                               pipelining=pipelining)
    finally:
        server.close()
    # 550 at RCPT (pipelined: then 503 to DATA): refused by the RCPT's code, the session goes on (RSET); no reply for 0.5 s: refused by the error,
    # the connection is replaced for the next message
    assert result.refused == {"550": 2, "TimeoutError": 1}
    assert result.accepted == 17
    # aiosmtpd drops the stalled transaction when the injector hangs up on it
    ids = sorted(int(c.split(b"X-Bench-Id: ")[1].split(b"\r\n")[0]) for _, _, c in handler.messages)
    assert ids == [i for i in range(20) if i not in (3, 5, 7)]


async def test_injector_stops_at_the_time_limit() -> None:
    handler = RecordingHandler(stall_ids=set(range(100)), stall_s=0.2)
    server, port = await aiosmtpd_server(handler)
    result = lean_smtp.Injection()
    started = time.monotonic()
    try:
        await lean_smtp.inject(port, workload(100), 2, result, time_limit=0.5)
    finally:
        server.close()
    assert result.timed_out and 0 < result.accepted < 100
    assert time.monotonic() - started < 5


class LockstepCheckingServer(asyncio.Protocol):
    """Answers each command line 20 ms late and notes any line that arrives while a reply is still owed:
    a client that pipelines would send MAIL, RCPT and DATA without waiting."""

    def __init__(self, log: dict) -> None:
        self.log, self.buffer, self.in_data, self.owed = log, b"", False, 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"220 strict.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                self.reply(b"250 2.0.0 queued")
                continue
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.log["commands"].append(line.split(b" ")[0].upper())
            if self.owed:
                self.log["early"] += 1
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.reply(b"250-strict.test\r\n250-PIPELINING\r\n250 8BITMIME")
            elif verb == b"DATA":
                self.reply(b"354 go ahead", then_data=True)
            elif verb == b"QUIT":
                self.reply(b"221 bye")
            else:
                self.reply(b"250 ok")

    def reply(self, text: bytes, then_data: bool = False) -> None:
        self.owed += 1

        def send() -> None:
            self.owed -= 1
            self.in_data = self.in_data or then_data
            if not self.transport.is_closing():
                self.transport.write(text + b"\r\n")
        asyncio.get_running_loop().call_later(0.02, send)


async def test_injector_waits_for_each_reply_even_when_pipelining_is_offered() -> None:
    log = {"commands": [], "early": 0}
    server = await asyncio.get_running_loop().create_server(lambda: LockstepCheckingServer(log), "127.0.0.1", 0)
    result = lean_smtp.Injection()
    try:
        await lean_smtp.inject(server.sockets[0].getsockname()[1], workload(5), 1, result, time_limit=30)
    finally:
        server.close()
    assert result.accepted == 5 and result.refused == {}
    assert log["early"] == 0
    assert log["commands"] == [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 5 + [b"QUIT"]


async def test_injector_pipelines_mail_rcpt_and_data_when_asked_and_offered_and_sends_content_after_354() -> None:
    log = {"commands": [], "early": 0}
    server = await asyncio.get_running_loop().create_server(lambda: LockstepCheckingServer(log), "127.0.0.1", 0)
    result = lean_smtp.Injection()
    try:
        await lean_smtp.inject(server.sockets[0].getsockname()[1], workload(5), 1, result, time_limit=30,
                               pipelining=True)
    finally:
        server.close()
    assert result.accepted == 5 and result.refused == {} and result.pipelined == 5
    assert log["early"] == 2 * 5  # RCPT and DATA came while the reply to MAIL was still owed
    # no content line was taken for a command: the content waited for the 354
    assert log["commands"] == [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 5 + [b"QUIT"]


def test_data_payload_stuffs_dots_and_ends_with_the_lone_dot() -> None:
    assert lean_smtp.data_payload(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert lean_smtp.data_payload(b"no end") == b"no end\r\n.\r\n"
    assert lean_smtp.data_payload(b"bare\nlf\n.x\r\n") == b"bare\r\nlf\r\n..x\r\n.\r\n"
    assert lean_smtp.data_payload(b"") == b".\r\n"

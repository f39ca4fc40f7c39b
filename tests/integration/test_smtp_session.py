"""The outbound SMTP session and its transactions against real servers on loopback.

A scripted raw server (bytes in, bytes out, split where we choose) checks the reply reader; the simulated
MX (aiosmtpd) with and without PIPELINING checks whole transactions through `open_connection`."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from mtad.deliver.connection import Timeouts, open_connection
from mtad.deliver.smtp_session import ProtocolViolation, ReplyTimeout, SessionClosed, SmtpSession
from mtad.deliver.transaction import run_transaction
from mtad.model import MxHost, Route
from mtad.policy.shaping import ShapeLimits
from mtad.simulate.smtp_sink import SinkBehaviour, SmtpSink

TIMEOUTS = Timeouts(connect_s=2, command_s=2, data_s=2)


class ScriptedServer:
    """Sends `chunks` (with a pause between them, so each is its own segment) and records what it got."""

    def __init__(self, chunks: list[bytes], close_after: bool = False) -> None:
        self.chunks, self.close_after, self.received = chunks, close_after, bytearray()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        for chunk in self.chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.02)
        if self.close_after:
            writer.close()
            return
        try:
            while data := await reader.read(4096):
                self.received += data
        finally:
            writer.close()

    async def session(self) -> SmtpSession:
        port = self.server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
        return SmtpSession.take_over(transport)


async def test_replies_split_anywhere_and_several_in_one_segment_are_read_in_order():
    chunks = [b"220 mx ready\r\n250-first line\r\n25", b"0-second\r\n250 third\r\n354 go", b" ahead\r\n", b"550 5.1.1 no\r\n"]
    async with ScriptedServer(chunks) as server:
        session = await server.session()
        assert await session.reply(1) == (220, "mx ready")
        assert await session.reply(1) == (250, "first line\nsecond\nthird")
        assert await session.reply(1) == (354, "go ahead")
        assert await session.reply(1) == (550, "5.1.1 no")
        session.close()


async def test_a_line_without_a_reply_code_ends_the_session():
    async with ScriptedServer([b"250 ok\r\nThank you for your mail\r\n"]) as server:
        session = await server.session()
        assert await session.reply(1) == (250, "ok")
        with pytest.raises(ProtocolViolation, match="Thank you"):
            await session.reply(1)
        assert not session.is_open


async def test_no_reply_in_time_is_a_timeout_and_the_session_is_closed():
    async with ScriptedServer([]) as server:
        session = await server.session()
        with pytest.raises(ReplyTimeout):
            await session.reply(0.2)
        assert not session.is_open
        with pytest.raises(ReplyTimeout):
            session.write(b"NOOP\r\n")


async def test_replies_sent_before_the_server_hung_up_are_still_read():
    async with ScriptedServer([b"250 ok\r\n421 4.4.2 bye\r\n"], close_after=True) as server:
        session = await server.session()
        await asyncio.sleep(0.2)
        assert await session.reply(1) == (250, "ok")
        assert await session.reply(1) == (421, "4.4.2 bye")
        with pytest.raises(SessionClosed):
            await session.reply(1)


async def test_a_reply_cancelled_from_outside_is_a_cancellation_not_a_timeout():
    async with ScriptedServer([]) as server:
        session = await server.session()
        waiting = asyncio.create_task(session.reply(5))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        session.close()


async def _connect(sink: SmtpSink):
    route = Route(hosts=(MxHost("mx.example", (sink.host,)),), port=sink.port)
    return await open_connection(
        route, ShapeLimits(), ehlo_name="mtad.test", timeouts=TIMEOUTS, verify_context=ssl.create_default_context()
    )


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
async def test_transactions_on_one_connection_deliver_refuse_and_stay_in_step(pipelining):
    behaviour = SinkBehaviour(pipelining=pipelining, recipient_replies={"gone@x.example": "550 5.1.1 no such user"})
    sink = SmtpSink("127.0.0.1", behaviour=behaviour)
    await sink.start()
    try:
        conn = await _connect(sink)
        assert ("pipelining" in conn.extensions) is pipelining
        message = b"From: a@b.example\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
        first = await run_transaction(
            conn, "a@b.example", [(1, "r1@x.example"), (2, "gone@x.example")], message,
            smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert {rid: reply.code for rid, reply in first.replies.items()} == {1: 250, 2: 550}
        assert first.reusable and not first.stale
        conn.deliveries += 1  # what the pool does on release: the next transaction starts with RSET
        nobody = await run_transaction(
            conn, "a@b.example", [(3, "gone@x.example")], message,
            smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert {rid: reply.code for rid, reply in nobody.replies.items()} == {3: 550}
        assert nobody.reusable
        conn.deliveries += 1
        second = await run_transaction(
            conn, "a@b.example", [(4, "r4@x.example")], message, smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert {rid: reply.code for rid, reply in second.replies.items()} == {4: 250}
        await conn.close()
        assert [m.rcpt_tos for m in sink.messages] == [["r1@x.example"], ["r4@x.example"]]
        assert all(m.data.endswith(b"\r\n.leading dot\r\n..two\r\nend\r\n") for m in sink.messages)  # unstuffed again
    finally:
        await sink.stop()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
async def test_a_connection_closed_while_idle_is_found_stale_at_its_rset_and_nothing_is_attempted(pipelining):
    sink = SmtpSink("127.0.0.1", behaviour=SinkBehaviour(pipelining=pipelining, hang_up_at_rset=True))
    await sink.start()
    try:
        conn = await _connect(sink)
        conn.deliveries = 1
        result = await run_transaction(
            conn, "a@b.example", [(1, "r1@x.example")], b"Subject: x\r\n\r\nx\r\n",
            smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert result.stale and not result.reusable and result.replies == {}
        assert sink.messages == []
        await conn.close()
    finally:
        await sink.stop()


async def test_a_refused_sender_under_pipelining_refuses_every_recipient_and_keeps_the_session_in_step():
    sink = SmtpSink("127.0.0.1", behaviour=SinkBehaviour(pipelining=True))
    await sink.start()
    try:
        conn = await _connect(sink)
        result = await run_transaction(
            conn, "a@", [(1, "r1@x.example"), (2, "r2@x.example")], b"Subject: x\r\n\r\nx\r\n",
            smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert {reply.code // 100 for reply in result.replies.values()} == {5} and len(result.replies) == 2
        assert result.reusable
        conn.deliveries += 1
        after = await run_transaction(
            conn, "a@b.example", [(3, "r3@x.example")], b"Subject: x\r\n\r\nx\r\n",
            smtputf8=False, timeouts=TIMEOUTS, throttle_patterns=(),
        )
        assert after.replies[3].code == 250
        await conn.close()
    finally:
        await sink.stop()

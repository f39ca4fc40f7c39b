"""The client side of an open SMTP session, for its transactions: write commands, read replies, pipelined.

aiosmtplib opens the session (greeting, EHLO, STARTTLS); then `SmtpSession.take_over` makes this protocol
the transport's. Why: aiosmtplib pairs one command with one reply and drops a reply that arrives while the
previous one waits to be picked up, so it cannot pipeline (RFC 2920), and its per-command machinery was
~10 % of the daemon in a py-spy profile of benchmarks/relay.py. With PIPELINING a transaction is one write
of RSET/MAIL/RCPT/DATA and one of the message, instead of a round trip per command; every reply is kept in
order until it is read.

Reply lines are parsed as RFC 5321 4.2 says: "ddd-text" continues, "ddd text" or "ddd" ends a reply. A line
without a reply code, a line over 8192 octets or a reply over 32 KiB ends the session: after such a line
nothing the server says can be paired with our commands.
"""

from __future__ import annotations

import asyncio
from collections import deque

MAX_LINE = 8192
MAX_REPLY = MAX_LINE * 4
_TIMED_OUT = object()


class SessionClosed(ConnectionError):
    """The server closed the connection (or it was lost) before the reply we waited for."""


class ReplyTimeout(TimeoutError):
    pass


class ProtocolViolation(Exception):
    """A line that is not an SMTP reply."""

    def __init__(self, line: str) -> None:
        super().__init__(f"Malformed SMTP response line: {line}")


class SmtpSession(asyncio.Protocol):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._lines: list[tuple[int, str]] = []  # the reply being received, line by line
        self._replies: deque[tuple[int, str]] = deque()
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[object] | None = None
        self.transport: asyncio.Transport | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport, unread: bytes = b"") -> SmtpSession:
        """Become the protocol of `transport` (left by aiosmtplib with `unread` bytes it had not parsed)."""
        session = cls()
        session.transport = transport
        transport.set_protocol(session)
        if unread:
            session.data_received(unread)
        return session

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._buffer += data
        start = 0
        try:
            while (end := self._buffer.find(b"\n", start)) >= 0:
                self._line(bytes(self._buffer[start:end]).rstrip(b"\r"))
                start = end + 1
            if len(self._buffer) - start > MAX_LINE:
                raise ProtocolViolation("line too long")
        except ProtocolViolation as violation:
            self._fail(violation)
            self.close()
            return
        finally:
            del self._buffer[:start]
        if self._replies:
            self._wake()

    def _line(self, line: bytes) -> None:
        code = line[:3]
        if len(line) > MAX_LINE or len(code) < 3 or not code.isdigit():
            raise ProtocolViolation(line[:200].decode("utf-8", "replace"))
        self._lines.append((int(code), line[4:].strip(b" \t").decode("utf-8", "surrogateescape")))
        if sum(len(text) for _, text in self._lines) > MAX_REPLY:
            raise ProtocolViolation("reply too long")
        if line[3:4] != b"-":
            self._replies.append((self._lines[-1][0], "\n".join(text for _, text in self._lines)))
            self._lines = []

    def eof_received(self) -> bool:
        self._fail(SessionClosed("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SessionClosed(f"connection lost: {type(exc).__name__}" if exc else "connection closed"))

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


    # -- for transactions -------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._failure is None and self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_open:
            raise self._failure or SessionClosed("connection closed")
        self.transport.write(data)

    async def reply(self, timeout_s: float) -> tuple[int, str]:
        """The next reply (code, text with lines joined by newlines), in the order the server sent them."""
        if not self._replies and self._failure is None:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout_s, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if waiter.result() is _TIMED_OUT:  # a late reply could never be paired with its command: hang up
                self._fail(ReplyTimeout())
                self.close()
        if self._replies:
            return self._replies.popleft()
        raise self._failure

    async def quit(self, timeout_s: float = 5.0) -> None:
        try:
            self.write(b"QUIT\r\n")
            await self.reply(timeout_s)
        except (OSError, TimeoutError, ProtocolViolation):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)

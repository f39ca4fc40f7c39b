"""Lean SMTP for benchmarks/relay.py: a sink and an injector that cost little CPU, so the MTAs get the cores.

On the 2-core machine the paired relay benchmark runs on, aiosmtpd (the sink) and aiosmtplib (the injector)
cost about 0.6-0.75 ms of CPU per message each: at ~400 msg/s the harness kept half a core busy and measured
itself as much as the MTAs. Postfix's smtp-source and smtp-sink are cheap but cannot carry or read the
per-message `X-Bench-Sent` stamp the latency is computed from. Both sides here are plain asyncio.Protocol
state machines (no StreamReader, no per-command coroutine): one read event parses every complete command or
reply it holds and, on the sink, answers them with one write.

Sink, as its own process:

    python benchmarks/lean_smtp.py sink RESULT_FILE PROGRESS_FILE MAX_SECONDS SAMPLES

the same contract as benchmarks/deliver.py's SINK_SCRIPT (without its WATCH feature): binds 127.0.0.1:0 and
prints the port on stdout, answers 250 to every message, rewrites PROGRESS_FILE ("count last-arrival") every
0.1 s, and on SIGTERM/SIGINT, or after MAX_SECONDS (a safety net should its parent die without stopping it),
writes RESULT_FILE: JSON with arrivals, sent, ids, dkim, samples, transactions, rcpts, mail_at, unsub_urls,
one_click, one entry per recipient, found with the same regular expressions on the header block. It speaks
the ESMTP that Postfix's smtp client (which pipelines MAIL/RCPT/DATA) and aiosmtplib (mtad's) use: EHLO with
PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8 (like smtp-sink), HELO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT; 502 for anything else. `LeanSink` starts and reads it from the benchmark's process.

Injector, in the benchmark's process: `inject()` opens plain SMTP sessions (no TLS, no AUTH) past EHLO before
the clock starts, then each session takes the next message and sends MAIL, RCPT, DATA waiting for each reply,
then the dot-stuffed content, and counts the final reply. With `pipelining=True` a session whose server offers
PIPELINING (RFC 2920; Postfix and mtad both do) sends MAIL, RCPT and DATA in one write, as Postfix's own smtp
client does, and reads their three replies before the content.

Standard library only (uvloop when installed), so the sink process starts quickly and stays small.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SINK_HOSTNAME = b"sink.bench"
SINK_READY_TIMEOUT_S = 15
SINK_SAMPLES = 5  # raw messages the sink keeps (benchmarks/deliver.py checks their DKIM signatures with dkimpy)
MAX_COMMAND_LINE = 4096  # RFC 5321 allows 512 octets; more than this much without a line end is not SMTP
ADVERTISED_SIZE = 10_240_000  # smtp-sink's default message size limit

# -- the sink ---------------------------------------------------------------------------------------

# The same expressions as deliver.SINK_SCRIPT, on the same header block: the records must not differ.
SENT = re.compile(rb"^X-Bench-Sent:[ \t]*([0-9.]+)", re.M | re.I)
ID = re.compile(rb"^X-Bench-Id:[ \t]*(-?[0-9]+)", re.M | re.I)
DKIM = re.compile(rb"^DKIM-Signature:", re.M | re.I)
UNSUB = re.compile(rb"^List-Unsubscribe:[^\r\n]*?<(https?://[^>\s]+)>", re.M | re.I)
ONE_CLICK = re.compile(rb"^List-Unsubscribe-Post:[ \t]*List-Unsubscribe=One-Click[ \t]*\r?$", re.M | re.I)

GREETING = b"220 " + SINK_HOSTNAME + b" ESMTP bench sink\r\n"
EHLO_REPLY = (b"250-" + SINK_HOSTNAME + b"\r\n250-PIPELINING\r\n250-SIZE " + str(ADVERTISED_SIZE).encode()
              + b"\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
HELO_REPLY = b"250 " + SINK_HOSTNAME + b"\r\n"
OK = b"250 2.0.0 Ok\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
BYE = b"221 2.0.0 Bye\r\n"
NOT_RECOGNIZED = b"502 5.5.2 Error: command not recognized\r\n"
NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
LINE_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
END_OF_DATA = b"\r\n.\r\n"


def syntax_error(usage: bytes) -> bytes:
    return b"501 5.5.4 Syntax: " + usage + b"\r\n"


class SinkRecords:
    """What arrived, one entry per recipient, as deliver.SINK_SCRIPT records it."""

    def __init__(self, samples: int) -> None:
        self.max_samples = samples
        self.arrivals: list[float] = []
        self.sent: list[float | None] = []
        self.ids: list[int | None] = []
        self.dkim: list[int] = []
        self.samples: list[str] = []
        self.rcpts: list[str] = []
        self.mail_at: list[float | None] = []
        self.unsub_urls: list[str | None] = []
        self.one_click: list[bool] = []
        self.transactions = 0

    def add(self, content: bytes, rcpts: list[str], mail_at: float | None) -> None:
        now = time.time()
        end = content.find(b"\r\n\r\n")
        head = content if end < 0 else content[:end + 2]
        m_sent, m_id, m_unsub = SENT.search(head), ID.search(head), UNSUB.search(head)
        sent = float(m_sent.group(1)) if m_sent else None
        index = int(m_id.group(1)) if m_id else None
        signatures = len(DKIM.findall(head))
        url = m_unsub.group(1).decode("ascii", "replace") if m_unsub else None
        post = ONE_CLICK.search(head) is not None
        self.transactions += 1
        for rcpt in rcpts:
            self.arrivals.append(now)
            self.sent.append(sent)
            self.ids.append(index)
            self.dkim.append(signatures)
            self.rcpts.append(rcpt.lower())
            self.mail_at.append(mail_at)
            self.unsub_urls.append(url)
            self.one_click.append(post)
        if len(self.samples) < self.max_samples:
            self.samples.append(base64.b64encode(content).decode())

    def as_json(self) -> dict:
        return {"arrivals": self.arrivals, "sent": self.sent, "ids": self.ids, "dkim": self.dkim,
                "samples": self.samples, "transactions": self.transactions, "rcpts": self.rcpts,
                "mail_at": self.mail_at, "unsub_urls": self.unsub_urls, "one_click": self.one_click}


def envelope_address(argument: bytes, keyword_length: int) -> str:
    """The address of `FROM:<a@b> PARAMS` / `TO:<a@b> PARAMS` (without the brackets; parameters ignored)."""
    value = argument[keyword_length:].strip()
    if value.startswith(b"<"):
        close = value.find(b">")
        value = value[1:close] if close > 0 else value[1:]
    else:
        value = value.split(b" ", 1)[0]
    return value.decode("utf-8", "replace")


class SinkSession(asyncio.Protocol):
    """One SMTP session of the sink. Input is a byte stream: a read may hold several pipelined commands, part
    of one, or any slice of a DATA body (the `<CRLF>.<CRLF>` included); every reply a read produces goes out
    in one write, which is what a pipelining client waits for."""

    def __init__(self, records: SinkRecords) -> None:
        self.records = records
        self.transport: asyncio.Transport | None = None
        self.commands = bytearray()
        # During DATA: a CRLF, then the body as it arrives; the leading CRLF lets one search find the end
        # of an empty body too ("." as the very first line).
        self.body: bytearray | None = None
        self.scanned = 0  # in `body`: no end of data starts before this offset
        self.mail_at: float | None = None
        self.rcpts: list[str] = []
        self.quitting = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        if self.quitting:
            return
        replies: list[bytes] = []
        if self.body is not None:
            self.body += data
        else:
            self.commands += data
        while True:
            if self.body is not None:
                end = self.body.find(END_OF_DATA, self.scanned)
                if end < 0:
                    # the end marker may begin in the last 4 bytes and be completed by the next read
                    self.scanned = max(len(self.body) - (len(END_OF_DATA) - 1), 0)
                    break
                self.end_of_message(end)
                replies.append(QUEUED)
                continue
            newline = self.commands.find(b"\n")
            if newline < 0:
                if len(self.commands) > MAX_COMMAND_LINE:
                    replies.append(LINE_TOO_LONG)
                    self.quitting = True
                break
            line = bytes(self.commands[:newline + 1])
            del self.commands[:newline + 1]
            replies.append(self.command(line))
            if self.quitting:
                break
        if replies:
            self.transport.write(b"".join(replies))
        if self.quitting:
            self.transport.close()

    def end_of_message(self, end: int) -> None:
        """The body ends at `end` (the CRLF before the lone dot): record it; what follows is commands."""
        body = self.body
        raw = bytes(body[:end + 2])  # the leading CRLF through the last line's CRLF
        if b"\r\n." in raw:
            raw = raw.replace(b"\r\n.", b"\r\n")  # undo the dot-stuffing: the first dot of such a line goes
        self.commands = body[end + len(END_OF_DATA):]
        self.body = None
        self.records.add(raw[2:], self.rcpts, self.mail_at)
        self.reset()

    def reset(self) -> None:
        self.mail_at, self.rcpts = None, []

    def command(self, line: bytes) -> bytes:
        verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
        verb = verb.upper()
        if verb == b"MAIL":
            if self.mail_at is not None:
                return NESTED_MAIL
            if argument[:5].upper() != b"FROM:":
                return syntax_error(b"MAIL FROM:<address>")
            self.mail_at = time.time()  # the start of this delivery attempt
            return MAIL_OK
        if verb == b"RCPT":
            if self.mail_at is None:
                return NEED_MAIL
            if argument[:3].upper() != b"TO:":
                return syntax_error(b"RCPT TO:<address>")
            self.rcpts.append(envelope_address(argument, 3))
            return RCPT_OK
        if verb == b"DATA":
            if not self.rcpts:
                return NEED_RCPT
            self.body = bytearray(b"\r\n")
            self.body += self.commands  # pipelined body bytes that came with the DATA command
            self.commands = bytearray()
            self.scanned = 0
            return START_DATA
        if verb == b"EHLO" or verb == b"HELO":
            if not argument.strip():
                return syntax_error(verb + b" hostname")
            self.reset()
            return EHLO_REPLY if verb == b"EHLO" else HELO_REPLY
        if verb == b"RSET":
            self.reset()
            return OK
        if verb == b"NOOP":
            return OK
        if verb == b"QUIT":
            self.quitting = True
            return BYE
        return NOT_RECOGNIZED


async def serve_sink(result_path: str, progress_path: str, max_seconds: float, samples: int) -> None:
    records = SinkRecords(samples)
    await serve_recording(lambda: SinkSession(records), result_path, progress_path, max_seconds,
                          lambda: (len(records.arrivals), records.arrivals[-1] if records.arrivals else 0),
                          records.as_json)


async def serve_recording(protocol_factory, result_path: str, progress_path: str, max_seconds: float,
                          progress, result) -> None:
    """A sink process's life, shared with deliver.SINK_SCRIPT: bind 127.0.0.1:0 and print the port, rewrite
    PROGRESS_FILE ("count last-arrival" from `progress()`) every 0.1 s until SIGTERM/SIGINT or `max_seconds`
    (a safety net should the benchmark die without stopping it), then write `result()` as JSON."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory, sock=sock, backlog=1000)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(sock.getsockname()[1], flush=True)
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        count, last = progress()
        with open(progress_path + ".tmp", "w") as out:
            out.write(f"{count} {last}\n")
        os.replace(progress_path + ".tmp", progress_path)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass
    server.close()
    with open(result_path + ".tmp", "w") as out:
        json.dump(result(), out)
    os.replace(result_path + ".tmp", result_path)


def run_on_fastest_loop(coroutine) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coroutine)


class LeanSink:
    """The lean sink process, with the interface of deliver.AiosmtpdSink: `port`, `received()`,
    `cpu_seconds()`, `stop()` (returns the records)."""

    def __init__(self, workdir: Path, max_seconds: float, samples: int = SINK_SAMPLES) -> None:
        self.result_path = workdir / "sink-result.json"
        self.progress_path = workdir / "sink-progress"
        log_path = workdir / "sink.log"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "sink", str(self.result_path),
                 str(self.progress_path), str(max_seconds), str(samples)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True)  # Ctrl-C reaches the benchmark only; it stops the sink itself
        try:
            self.port = int(self._first_line(log_path))
        except (RuntimeError, ValueError):
            self._terminate()
            raise

    def _first_line(self, log_path: Path) -> str:
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(SINK_READY_TIMEOUT_S)
        if not line or not line[0].strip():
            raise RuntimeError(f"the lean sink did not start: {log_path.read_text(errors='replace')[-1500:]}")
        return line[0].decode().strip()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def received(self) -> tuple[int, float]:
        """(messages received so far, time.time() of the last arrival)."""
        try:
            count, last = self.progress_path.read_text().split()
            return int(count), float(last)
        except (OSError, ValueError):
            return 0, 0.0

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> dict:
        self._terminate()
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {}


# -- the injector -----------------------------------------------------------------------------------

@dataclass
class Injection:
    accepted: int = 0
    refused: dict = field(default_factory=dict)  # reply code, or the error's type name -> messages
    first_sent: float = 0.0
    elapsed: float = 0.0
    timed_out: bool = False
    accepted_at: list[float] = field(default_factory=list)  # time.time() of each 250
    pipelined: int = 0  # transactions whose MAIL, RCPT and DATA went in one write

    def refuse(self, key: str) -> None:
        self.refused[key] = self.refused.get(key, 0) + 1


class SMTPReplyError(Exception):
    """The server refused the greeting, EHLO and HELO, or answered something that is not an SMTP reply."""

    def __init__(self, code: int, line: bytes) -> None:
        super().__init__(line.decode("utf-8", "replace").rstrip())
        self.code = code


def data_payload(message: bytes) -> bytes:
    """What goes after the 354: the message with CRLF line ends, every line that starts with a dot given
    another one (RFC 5321 4.5.2), ending in CRLF, then the lone dot."""
    if message.count(b"\n") != message.count(b"\r\n"):  # a bare LF would be read as a line end by some MTAs
        message = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    if b"\r\n." in message:
        message = message.replace(b"\r\n.", b"\r\n..")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


class InjectorSession(asyncio.Protocol):
    """One client session as a state machine run from data_received: each reply calls the step that waits for
    it, which writes the next command. The coroutine that drives the session awaits one future per
    operation (connect, one message, QUIT), not one per reply."""

    def __init__(self, helo: str, pipelining: bool = False) -> None:
        self.helo = helo.encode()
        self.pipelining = pipelining  # wanted; used once the server's EHLO offered it
        self.server_pipelines = False
        self.transport: asyncio.Transport | None = None
        self.replies = bytearray()
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future = self.loop.create_future()  # the current operation: first the greeting + EHLO
        self.step: Callable[[int, bytes], None] | None = self.after_greeting
        self.waiting_since = self.loop.time()  # when the awaited reply was asked for (timeouts)
        self.refused_code = 0  # the code a refused transaction is reported with once its RSET is answered
        self.payload = b""
        self.rcpt_line = b""
        self.closed = False

    # -- the transport

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.step = None
        if not self.done.done():
            if self.refused_code:  # the refusal was heard; the RSET after it does not matter
                self.done.set_result(self.refused_code)
            else:
                self.done.set_exception(exc if isinstance(exc, OSError)
                                        else ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.replies += data
        while True:
            newline = self.replies.find(b"\n")
            if newline < 0:
                return
            line = bytes(self.replies[:newline + 1])
            del self.replies[:newline + 1]
            if line[4:].strip().upper() == b"PIPELINING":
                self.server_pipelines = True  # an EHLO keyword line
            if line[3:4] == b"-":
                continue  # a line of a multi-line reply: the last one carries the outcome
            step, self.step = self.step, None
            try:
                code = int(line[:3])
            except ValueError:
                code = 0
            if step is None or not 200 <= code < 600:
                self.fail(SMTPReplyError(code, line))
                return
            step(code, line)

    def expect(self, step: Callable[[int, bytes], None], command: bytes) -> None:
        self.step = step
        self.waiting_since = self.loop.time()
        self.transport.write(command)

    def finish(self, code: int) -> None:
        self.step = None
        if not self.done.done():
            self.done.set_result(code)

    def fail(self, exc: Exception) -> None:
        """Give up on the session: the current operation raises `exc`, the connection is dropped."""
        self.step = None
        if not self.done.done():
            self.done.set_exception(exc)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def expire(self, now: float, timeout_s: float) -> None:
        if self.step is not None and now - self.waiting_since > timeout_s:
            self.fail(TimeoutError(f"no reply within {timeout_s:g} s"))

    # -- opening: greeting, then EHLO (HELO should EHLO be refused)

    def after_greeting(self, code: int, line: bytes) -> None:
        if code != 220:
            self.fail(SMTPReplyError(code, line))
        else:
            self.expect(self.after_ehlo, b"EHLO " + self.helo + b"\r\n")

    def after_ehlo(self, code: int, line: bytes) -> None:
        if code // 100 == 2:
            self.finish(code)
        else:
            self.expect(self.after_helo, b"HELO " + self.helo + b"\r\n")

    def after_helo(self, code: int, line: bytes) -> None:
        if code // 100 == 2:
            self.finish(code)
        else:
            self.fail(SMTPReplyError(code, line))

    # -- one message: MAIL, RCPT, DATA, content, each after the reply to the one before

    def transaction(self, sender: str, recipient: str, message: bytes) -> asyncio.Future:
        """Send one message; the future is the final reply code, or the code that refused it earlier."""
        self.done = self.loop.create_future()
        self.refused_code = 0
        self.rcpt_line = b"RCPT TO:<" + recipient.encode() + b">\r\n"
        self.payload = data_payload(message)
        mail_line = b"MAIL FROM:<" + sender.encode() + b">\r\n"
        if self.pipelining and self.server_pipelines:
            self.expect(self.pipelined_after_mail, mail_line + self.rcpt_line + b"DATA\r\n")
        else:
            self.expect(self.after_mail, mail_line)
        return self.done

    def after_mail(self, code: int, line: bytes) -> None:
        if code // 100 != 2:
            self.refused(code, line)
        else:
            self.expect(self.after_rcpt, self.rcpt_line)

    def after_rcpt(self, code: int, line: bytes) -> None:
        if code // 100 != 2:
            self.refused(code, line)
        else:
            self.expect(self.after_data, b"DATA\r\n")

    def after_data(self, code: int, line: bytes) -> None:
        if code != 354:
            self.refused(code, line)
        else:
            payload, self.payload = self.payload, b""
            self.expect(self.after_message, payload)

    def after_message(self, code: int, line: bytes) -> None:
        self.finish(code)
        if code == 421:  # the server is closing the session; the next message reconnects
            self.closed = True
            self.transport.close()

    # -- one message, pipelined: MAIL, RCPT and DATA went in one write; their replies come one by one

    def pipelined_after_mail(self, code: int, line: bytes) -> None:
        self.refused_code = 0 if code // 100 == 2 else code
        self.step = self.pipelined_after_rcpt

    def pipelined_after_rcpt(self, code: int, line: bytes) -> None:
        if code // 100 != 2 and not self.refused_code:
            self.refused_code = code
        self.step = self.pipelined_after_data

    def pipelined_after_data(self, code: int, line: bytes) -> None:
        if code == 354 and not self.refused_code:
            self.after_data(code, line)
        elif code == 354:  # accepted DATA of a transaction already refused: end it empty (RFC 2920 3.1)
            self.expect(lambda _code, _line: self.refused(self.refused_code, line), b".\r\n")
        else:
            self.refused(self.refused_code or code, line)

    def refused(self, code: int, line: bytes) -> None:
        """Refused before the content: RSET, so the next message starts a clean transaction. A 421 closes
        the session instead (the server is going away); the next message reconnects."""
        self.refused_code = code
        if code == 421:
            self.after_message(code, line)
        else:
            self.expect(lambda _code, _line: self.finish(self.refused_code), b"RSET\r\n")

    # -- the end

    async def quit(self, timeout_s: float) -> None:
        """QUIT when idle; a session cut off mid-operation (setup or --time-limit ran out) is just closed."""
        if not self.closed and self.step is None:
            self.done = self.loop.create_future()
            self.expect(self.after_message, b"QUIT\r\n")
            try:
                await asyncio.wait_for(self.done, timeout_s)
            except (OSError, TimeoutError, SMTPReplyError):
                pass
        self.closed = True
        if self.transport is not None:
            self.transport.close()


MessageProducer = Callable[[float], bytes]  # the X-Bench-Sent stamp -> the message's bytes


async def inject(port: int, messages: Sequence[tuple[str, str, MessageProducer]], clients: int,
                 result: Injection, on_connected: Callable[[], None] = lambda: None, *, time_limit: float,
                 host: str = "127.0.0.1", helo: str = "bench.client", reply_timeout_s: float = 30,
                 setup_timeout_s: float = 60, pipelining: bool = False) -> None:
    """Send `messages` (sender, recipient, producer) over `clients` sessions; fill `result`.

    The sessions are connected and past EHLO before `on_connected()` starts the clock. Each session then takes
    the next message: `sent = time.time()` just before its MAIL, the producer builds the message with that
    stamp, and the final reply counts it as accepted (2xx) or refused (by code). A session that fails (lost
    connection, no reply within `reply_timeout_s`, a reply that is not SMTP) counts its message as refused by
    the error's type name and is replaced by a new connection for the next message. After `time_limit`
    seconds the remaining messages are not sent (`result.timed_out`). Every session ends with QUIT."""
    loop = asyncio.get_running_loop()
    live: set[InjectorSession] = set()

    async def open_session() -> InjectorSession:
        _, session = await loop.create_connection(lambda: InjectorSession(helo, pipelining), host, port)
        live.add(session)
        await session.done
        return session

    async def expire_silent_sessions() -> None:  # one timer for all sessions instead of one per reply
        while True:
            await asyncio.sleep(min(1.0, reply_timeout_s / 4))
            now = loop.time()
            for session in list(live):
                if session.closed:
                    live.discard(session)
                else:
                    session.expire(now, reply_timeout_s)

    work = iter(range(len(messages)))

    async def worker(session: InjectorSession | None) -> None:
        for index in work:
            sender, recipient, produce = messages[index]
            try:
                if session is None or session.closed:
                    session = await open_session()
                sent = time.time()
                if not result.first_sent:
                    result.first_sent = sent
                if session.pipelining and session.server_pipelines:
                    result.pipelined += 1
                code = await session.transaction(sender, recipient, produce(sent))
            except (OSError, TimeoutError, SMTPReplyError) as exc:
                result.refuse(type(exc).__name__)
                if session is not None:
                    session.fail(exc)
                session = None
                continue
            if 200 <= code < 300:
                result.accepted += 1
                result.accepted_at.append(time.time())
            else:
                result.refuse(str(code))

    watchdog = loop.create_task(expire_silent_sessions())
    try:
        async with asyncio.timeout(setup_timeout_s):
            sessions = await asyncio.gather(*(open_session() for _ in range(clients)))
        on_connected()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(time_limit):
                await asyncio.gather(*(worker(session) for session in sessions))
        except TimeoutError:
            result.timed_out = True
        result.elapsed = time.perf_counter() - started
    finally:
        watchdog.cancel()
        await asyncio.gather(*(session.quit(5) for session in list(live)), return_exceptions=True)
        for session in live:
            if session.transport is not None:
                session.transport.abort()


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "sink":
        print("usage: lean_smtp.py sink RESULT_FILE PROGRESS_FILE MAX_SECONDS SAMPLES", file=sys.stderr)
        return 2
    _, result_path, progress_path, max_seconds, samples = argv
    run_on_fastest_loop(serve_sink(result_path, progress_path, float(max_seconds), int(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One SMTP transaction on an open connection: MAIL, RCPT per recipient, DATA; a reply for every recipient.

In:  a connection, the envelope (sender, recipients with their ids), the message bytes.
Out: `TransactionResult`: each recipient's reply (what the remote server said, or a 4.4.2 "connection
     lost" when it said nothing), whether the connection can carry another message, and the throttling
     reply if the server asked us to slow down.
Only replies are returned here; classifying them into outcomes is the caller's (pure) business.
With PIPELINING (RFC 2920, offered by every large provider) the commands up to DATA go in one write and
the message in a second, the replies read in order; without it, command by command. A reused connection
is first RSET (in the same write when pipelining): a connection the server closed while it sat idle is
found out then, before anything was attempted.
A stall is bounded by `command_timeout` (RSET, MAIL, RCPT) or `data_timeout` (DATA and the final ".",
RFC 5321 4.5.3.2) and recorded as "no reply to <stage> within Ns"; a line that is not SMTP (no reply code)
ends the session like a lost connection: after it, nothing the server says can be paired with our commands.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mtad.deliver.connection import OutboundConnection, Timeouts, reply_of
from mtad.deliver.smtp_session import ProtocolViolation, ReplyTimeout, SmtpSession
from mtad.model import Reply
from mtad.policy.message_text import normalize_line_endings
from mtad.policy.throttling import is_throttling_reply

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class TransactionResult:
    replies: dict[int, Reply] = field(default_factory=dict)
    reusable: bool = True
    throttled: Reply | None = None
    connection_lost: bool = False
    lost_reply: Reply | None = None  # why the session ended mid-transaction (timeout, reset, garbage, 421)
    withdrawn: list[int] = field(default_factory=list)  # not attempted: `still_wanted` said no just before MAIL
    stale: bool = False  # the reused connection had died while idle (RSET failed): nothing was attempted


async def run_transaction(
    conn: OutboundConnection,
    mail_from: str,
    recipients: list[tuple[int, str]],
    message: bytes,
    *,
    smtputf8: bool,
    timeouts: Timeouts,
    throttle_patterns: tuple[str, ...],
    still_wanted: Callable[[int], bool] = lambda recipient_id: True,
) -> TransactionResult:
    """`still_wanted` is asked for every recipient immediately before the commands are written, with no
    await in between: an unsubscribe that arrived up to that moment is honoured."""
    result = TransactionResult()
    session = conn.session
    result.withdrawn = [rid for rid, _ in recipients if not still_wanted(rid)]
    recipients = [(rid, address) for rid, address in recipients if rid not in result.withdrawn]
    if not recipients:
        return result
    pending = dict(recipients)
    options = ""
    if smtputf8:
        if "smtputf8" not in conn.extensions:
            return _all(result, pending, Reply(550, "5.6.7", "the receiving server does not support SMTPUTF8"))
        options += " SMTPUTF8"
    if "8bitmime" in conn.extensions and not message.isascii():
        options += " BODY=8BITMIME"
    if _CONTROL.search(mail_from) or any(_CONTROL.search(address) for _, address in recipients):
        return _all(result, pending, Reply(553, "5.1.3", "address contains control characters"))
    encoding = "utf-8" if smtputf8 else "ascii"
    pipelining = "pipelining" in conn.extensions
    stage = "RSET"
    try:
        commands = [f"MAIL FROM:<{mail_from}>{options}\r\n".encode(encoding)]
        commands += [f"RCPT TO:<{address}>\r\n".encode(encoding) for _, address in recipients]
        commands.append(b"DATA\r\n")
        if conn.deliveries:
            commands.insert(0, b"RSET\r\n")
        if pipelining:
            session.write(b"".join(commands))
        sent = iter(commands)

        async def reply_to_next(timeout_s: float) -> tuple[int, str]:
            command = next(sent)
            if not pipelining:
                session.write(command)
            return await session.reply(timeout_s)

        if conn.deliveries:
            try:
                code, _ = await reply_to_next(timeouts.command_s)
            except (OSError, TimeoutError, ProtocolViolation):
                code = 0
            if code != 250:  # a 421 "idle too long" included
                # The server closed it while it sat in our pool (its idle timeout may be shorter than ours):
                # no attempt was made, and the caller simply takes another connection.
                result.stale, result.reusable = True, False
                return result
        stage = "MAIL FROM"
        code, text = await reply_to_next(timeouts.command_s)
        if not 200 <= code < 300:
            clean = True
            if pipelining:  # the server still answers the RCPTs and DATA we sent (with 503s)
                clean = await _skip_replies(session, len(recipients) + 1, timeouts.command_s)
            _refused(result, pending, reply_of(code, text), throttle_patterns)
            result.reusable = result.reusable and clean
            return result
        accepted = []
        stage = "RCPT TO"
        for recipient_id, _ in recipients:
            code, text = await reply_to_next(timeouts.command_s)
            if 200 <= code < 300:
                accepted.append(recipient_id)
                continue
            reply = reply_of(code, text)
            result.replies[recipient_id] = reply
            pending.pop(recipient_id)
            _note_throttle(result, reply, throttle_patterns)
            if code == 421:
                return _lost(result, pending, reply)
        if not accepted and not pipelining:
            return result  # DATA not sent; the next transaction on this connection starts with RSET
        stage = "DATA"
        code, text = await reply_to_next(timeouts.data_s)
        if code == 354 and not accepted:  # a pipelining server that let DATA through: send it an empty message
            session.write(b".\r\n")
            code, text = await session.reply(timeouts.data_s)
            return result
        if code == 354:
            session.write(_dot_stuffed(message))
            code, text = await session.reply(timeouts.data_s)
        if not accepted:
            return result
        reply = reply_of(code, text)
        if code != 250:
            _note_throttle(result, reply, throttle_patterns)
            result.reusable = code != 421
        for recipient_id in accepted:
            result.replies[recipient_id] = reply
            pending.pop(recipient_id, None)
    except ProtocolViolation as exc:
        text = " ".join(str(exc).split())
        return _lost(result, pending, Reply(451, "4.5.0", f"invalid reply to {stage}: {text}"[:300]))
    except ReplyTimeout:
        return _lost(result, pending, Reply(451, "4.4.2", f"no reply to {stage} within {_bound(stage, timeouts)}"))
    except (OSError, UnicodeError) as exc:
        return _lost(result, pending, Reply(451, "4.4.2", f"connection lost during {stage}: {type(exc).__name__}"))
    return result


async def _skip_replies(session: SmtpSession, count: int, timeout_s: float) -> bool:
    """Read the replies to pipelined commands that no longer matter; False when the session is not clean
    after them (it broke, or the server is waiting for a message after a 354)."""
    try:
        for _ in range(count):
            code, _ = await session.reply(timeout_s)
    except (OSError, TimeoutError, ProtocolViolation):
        return False
    return code != 354


def _dot_stuffed(message: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.5.2): CRLF lines, a leading dot doubled, "." to end."""
    message = normalize_line_endings(message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\r\n.", b"\r\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"


def _bound(stage: str, timeouts: Timeouts) -> str:
    if stage == "DATA":
        return f"{timeouts.data_s:g}s (data_timeout)"
    return f"{timeouts.command_s:g}s (command_timeout)"


def _all(result: TransactionResult, pending: dict[int, str], reply: Reply) -> TransactionResult:
    for recipient_id in pending:
        result.replies[recipient_id] = reply
    return result


def _refused(result, pending, reply: Reply, patterns) -> TransactionResult:
    _note_throttle(result, reply, patterns)
    result.reusable = reply.code != 421
    return _all(result, pending, reply)


def _lost(result: TransactionResult, pending: dict[int, str], reply: Reply) -> TransactionResult:
    result.reusable = False
    result.connection_lost = reply.code != 421
    result.lost_reply = reply
    return _all(result, pending, reply)


def _note_throttle(result: TransactionResult, reply: Reply, patterns: tuple[str, ...]) -> None:
    if is_throttling_reply(reply.code, reply.enhanced, reply.text, patterns):
        result.throttled = reply

"""One SMTP transaction on an open connection: MAIL, RCPT per recipient, DATA; a reply for every recipient.

In:  a connection, the envelope (sender, recipients with their ids), the message bytes.
Out: `TransactionResult`: each recipient's reply (what the remote server said, or a 4.4.2 "connection
     lost" when it said nothing), whether the connection can carry another message, and the throttling
     reply if the server asked us to slow down.
Only replies are returned here; classifying them into outcomes is the caller's (pure) business.
A stall is bounded by `command_timeout` (RSET, MAIL, RCPT) or `data_timeout` (DATA and the final ".",
RFC 5321 4.5.3.2) and recorded as "no reply to <stage> within Ns"; a line that is not SMTP (no reply code)
ends the session like a lost connection: after it, nothing the server says can be paired with our commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from mtad.deliver.connection import CONNECTION_ERRORS, OutboundConnection, Timeouts, is_smtp_reply_code, reply_of
from mtad.model import Reply
from mtad.policy.throttling import is_throttling_reply


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
    """`still_wanted` is asked for every recipient immediately before MAIL FROM (after the RSET of a reused
    connection), with no await in between: an unsubscribe that arrived up to that moment is honoured."""
    result = TransactionResult()
    client = conn.client
    pending = dict(recipients)
    stage = "RSET"
    try:
        if conn.deliveries:
            try:
                await client.rset()  # a cheap probe that the reused connection is still alive and clean
            except CONNECTION_ERRORS:  # a 421 "idle too long" reply included (an SMTPException)
                # The server closed it while it sat in our pool (its idle timeout may be shorter than ours):
                # no attempt was made, and the caller simply takes another connection.
                result.stale, result.reusable = True, False
                return result
        result.withdrawn = [rid for rid, _ in recipients if not still_wanted(rid)]
        recipients = [(rid, address) for rid, address in recipients if rid not in result.withdrawn]
        for recipient_id in result.withdrawn:
            del pending[recipient_id]
        if not recipients:
            return result
        options = []
        if smtputf8:
            if not client.supports_extension("smtputf8"):
                return _all(result, pending, Reply(550, "5.6.7", "the receiving server does not support SMTPUTF8"))
            options.append("SMTPUTF8")
        if client.supports_extension("8bitmime") and not message.isascii():
            options.append("BODY=8BITMIME")
        stage = "MAIL FROM"
        try:
            await client.mail(mail_from, options=options, encoding="utf-8" if smtputf8 else "ascii")
        except aiosmtplib.SMTPResponseException as exc:
            if not is_smtp_reply_code(exc.code):
                raise
            return _refused(result, pending, reply_of(exc.code, exc.message), throttle_patterns)
        accepted = []
        stage = "RCPT TO"
        for recipient_id, address in recipients:
            try:
                await client.rcpt(address, encoding="utf-8" if smtputf8 else "ascii")
                accepted.append(recipient_id)
            except aiosmtplib.SMTPResponseException as exc:
                if not is_smtp_reply_code(exc.code):
                    raise
                reply = reply_of(exc.code, exc.message)
                result.replies[recipient_id] = reply
                pending.pop(recipient_id)
                _note_throttle(result, reply, throttle_patterns)
                if exc.code == 421:
                    return _lost(result, pending, reply)
        if not accepted:
            stage = "RSET"
            await client.rset()
            return result
        stage = "DATA"
        try:
            response = await client.data(message, timeout=timeouts.data_s)
            reply = reply_of(response.code, response.message)
        except aiosmtplib.SMTPResponseException as exc:
            if not is_smtp_reply_code(exc.code):
                raise
            reply = reply_of(exc.code, exc.message)
            _note_throttle(result, reply, throttle_patterns)
            result.reusable = exc.code != 421
        for recipient_id in accepted:
            result.replies[recipient_id] = reply
            pending.pop(recipient_id, None)
    except aiosmtplib.SMTPResponseException as exc:  # only a line without a reply code gets here
        text = " ".join(exc.message.split())
        return _lost(result, pending, Reply(451, "4.5.0", f"invalid reply to {stage}: {text}"[:300]))
    except (aiosmtplib.SMTPTimeoutError, TimeoutError):
        return _lost(result, pending, Reply(451, "4.4.2", f"no reply to {stage} within {_bound(stage, timeouts)}"))
    except CONNECTION_ERRORS as exc:
        return _lost(result, pending, Reply(451, "4.4.2", f"connection lost during {stage}: {type(exc).__name__}"))
    return result


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

"""One inbound message (bytes) -> `FeedbackVerdict`: a bounce, a complaint, an auto-reply, or unknown.

The first of these that applies decides:
1. a delivery status report, `multipart/report; report-type=delivery-status` (RFC 3464; RFC 6533's
   message/global-delivery-status too): one `RecipientReport` per recipient field group -> "bounce";
2. a feedback report, `message/feedback-report` (RFC 5965 ARF) -> "complaint";
3. an automatic reply (RFC 3834 Auto-Submitted, X-Autoreply, X-Autorespond, Precedence: auto_reply, the
   subjects of out-of-office and vacation replies, challenge/response) -> "auto_reply", never a bounce.
   Exim and Postfix mark their own bounces `Auto-Submitted: auto-replied` too, so a message the mail
   system sent (MAILER-DAEMON, postmaster, "Mail Delivery System") skips this step;
4. a bounce that is not a DSN (Exim, qmail, Yahoo, old Gmail, Exchange texts): recipients and SMTP replies
   are read from the text -> "bounce";
5. anything else -> "unknown".
Each recipient's reply is classified with the bounce rules (mtad.policy.bounce_rules); a DSN's Status
field wins over the enhanced code inside its Diagnostic-Code. Only a "failed" recipient can be hard.

Pure like policy/: no I/O, no clock. It never raises: whatever goes wrong in the email package or here
becomes kind "unknown" with the reason. Its output is bounded and clean: every string is one line without
control characters (PostgreSQL text refuses NUL, and the values go into logs and event rows) and within
the lengths of `_FIELD_LIMITS`; an address that is too long or not one line is dropped, not cut.
Work is bounded: the first MAX_MESSAGE_BYTES of a message, at most MAX_PARTS MIME parts, MAX_TEXT_CHARS
of any text searched. `load_bounce_rules` is the one function in this module that reads a file.
"""

from __future__ import annotations

import email
import html
import re
import tomllib
from dataclasses import dataclass, field, replace
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from pathlib import Path

from mtad.policy.bounce_rules import BounceRules, classify_reply, parse_bounce_rules, split_reply

MAX_MESSAGE_BYTES = 1_000_000
MAX_PARTS = 100
MAX_DEPTH = 8
MAX_TEXT_CHARS = 100_000
MAX_HEADER_CHARS = 998
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
# The single source of the rules; mtad is installed editable, production passes feedback.bounce_rules_file.
DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "config" / "bounce_rules.toml"

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ORIGINAL_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers")
_KEPT_HEADERS = (  # of the returned original; List-Unsubscribe carries mtad's per-recipient token
    "message-id", "return-path", "from", "to", "subject", "date", "list-id", "list-unsubscribe",
    "x-hmxmroriginalrecipient",
)
_MAIL_SYSTEM_LOCAL_PARTS = {"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"}
_MAIL_SYSTEM_NAME = re.compile(r"mail delivery (system|subsystem)|mailer-daemon|postmaster", re.IGNORECASE)
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-reply")
_AUTO_SUBJECT = re.compile(
    r"\bauto(matic|matische?)?[ -]?(reply|response|antwort|antwoord)\b|^\s*auto:|\bout of (the )?office\b"
    r"|abwesenheitsnotiz|afwezigheidsbericht|r[ée]ponse automatique|risposta automatica"
    r"|respuesta autom[aá]tica|\bvacation\b|\baway from (the |my )?office\b|\bautoreply\b",
    re.IGNORECASE,
)
_CHALLENGE_SUBJECT = re.compile(
    r"please confirm (your|this) (message|e-?mail|request)|(confirm|verify) (that )?you are (a )?(human|real"
    r" person|not a robot)|sender verification|awaiting (your )?confirmation|verification (request|required)",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|mail delivery (failed|failure)|delivery (status notification|failure|failed)"
    r"|failure notice|non-?delivery|returned to sender|could not be delivered|delayed mail|message .{0,40}delayed",
    re.IGNORECASE,
)
_SIGNATURES = (  # phrases mail systems write in bounces that are not DSNs, and who writes them
    (re.compile(r"This message was created automatically by mail delivery software", re.I), "Exim"),
    (re.compile(r"This is the qmail-send program", re.I), "qmail"),
    (re.compile(r"Sorry, we were unable to deliver your message to the following address", re.I), "Yahoo"),
    (re.compile(r"Delivery to the following recipients? (failed|has been delayed)", re.I), "Gmail"),
    (re.compile(r"message to \S+ couldn.?t be delivered", re.I), "Exchange"),
    (re.compile(r"Delivery has failed to these recipients", re.I), "Exchange"),
    (re.compile(r"did not reach some or all of the intended recipients", re.I), "Exchange"),
    (re.compile(r"wasn.?t able to deliver your message|following addresses? (had permanent fatal errors|failed)",
                re.I), "an MTA"),
    (re.compile(r"message could not be delivered|could not be delivered to one or more", re.I), "an MTA"),
)
_ORIGINAL_CUT = re.compile(
    r"^[ \t]*-+ ?(This is a copy of the message|Below this line is a copy of the message|Original message"
    r"|The original message|Message headers follow)[^\n]*|^Original message headers:[^\n]*",
    re.IGNORECASE | re.MULTILINE,
)
_ADDRESS = r"[^\s<>@\"(),;:\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,250}[A-Za-z0-9])?"
_ADDRESS_LINE = re.compile(rf"^[ \t]*<?({_ADDRESS})>?:?[ \t]*$", re.MULTILINE)
_ADDRESS_INLINE = re.compile(rf"message to <?({_ADDRESS})>? couldn|RCPT TO: ?<({_ADDRESS})>", re.IGNORECASE)
_REPLY_WITH_ENHANCED = re.compile(r"(?<![\w.])([45]\d\d)[ -]([45]\.\d{1,3}\.\d{1,3})(?![\w.])")
_REPLY_CODE_ONLY = re.compile(
    r"(?:^[ \t>#'\"]*|said:[ \t]*|returned:?[ \t]*'?|error:[ \t]*|<<<[ \t]*)([45]\d\d)(?:[ -]|:[ \t])", re.MULTILINE
)
_QMAIL_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")
_BARE_STATUS = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_REMOTE_HOST = re.compile(
    r"^\s*host ([A-Za-z0-9.-]+\.[A-Za-z0-9-]+)|^(\S+) does not like recipient|Giving up on ([\w.:-]+?)\.?\s*$",
    re.MULTILINE,
)
_DELAYED = re.compile(
    r"has not yet been delivered|has been delayed|delivery attempts will continue|still being retried"
    r"|will (continue to )?retry|temporary problem delivering",
    re.IGNORECASE,
)
_PERMANENT = re.compile(r"permanent (error|fatal)|failed permanently|I've given up|not going to try again", re.I)
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
MAX_ADDRESS_CHARS = 320  # RFC 5321 4.5.3.1: 64 octets of local part, @, 255 of domain
_FIELD_LIMITS = {"diagnostic": 1000, "remote_mta": 255, "feedback_type": 64, "reason": 300,
                 "original_message_id": MAX_HEADER_CHARS}


@dataclass(frozen=True)
class RecipientReport:
    recipient: str
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str | None  # RFC 3463 enhanced status code, "5.1.1"
    diagnostic: str | None  # the remote reply or the report's own words, one line
    remote_mta: str | None
    category: str  # mtad.policy.bounce_rules.CATEGORIES
    hard: bool  # the address itself is bad: suppress it


@dataclass(frozen=True)
class FeedbackVerdict:
    kind: str  # bounce | complaint | auto_reply | unknown
    recipients: tuple[RecipientReport, ...] = ()  # bounces
    complained_recipient: str | None = None  # complaints: Original-Rcpt-To, else the original's To
    feedback_type: str | None = None  # complaints: "abuse", "fraud", ...
    original_message_id: str | None = None
    original_envelope_from: str | None = None  # where mtad's VERP address ("b-TOKEN@bounces.example") comes back
    original_headers: dict[str, str] = field(default_factory=dict)  # lower-case names, e.g. "x-mtad-queue-id"
    reason: str = ""  # one line: why this verdict


def load_bounce_rules(path: Path | None) -> BounceRules:
    """Read and compile a bounce rules file; None: config/bounce_rules.toml of this source tree.

    Production passes `feedback.bounce_rules_file`. OSError when unreadable, ValueError naming file and rule.
    """
    chosen = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        return parse_bounce_rules(tomllib.loads(chosen.read_text(encoding="utf-8")))
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError too
        raise ValueError(f"{chosen}: {exc}") from None


def parse_feedback(message: bytes, rules: BounceRules) -> FeedbackVerdict:
    try:
        return _bounded(_parse(bytes(message[:MAX_MESSAGE_BYTES]), rules))
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises": broken input is "unknown"
        return _bounded(FeedbackVerdict(kind="unknown", reason=f"unparseable message ({type(exc).__name__}: {exc})"))


# --- what comes out: one-line strings of bounded length -------------------------------------------------


def _bounded(verdict: FeedbackVerdict) -> FeedbackVerdict:
    reports = tuple(
        replace(
            report,
            recipient=address,
            status=report.status if report.status and _STATUS.fullmatch(report.status) else None,
            diagnostic=_one_clean_line(report.diagnostic, "diagnostic"),
            remote_mta=_one_clean_line(report.remote_mta, "remote_mta"),
        )
        for report in verdict.recipients
        if (address := _clean_address(report.recipient)) is not None
    )
    headers = {
        name: _one_clean_line(value, "original_message_id") or ""
        for name, value in verdict.original_headers.items()
        if not _CONTROL.search(name)
    }
    return replace(
        verdict,
        recipients=reports,
        complained_recipient=_clean_address(verdict.complained_recipient),
        feedback_type=_one_clean_line(verdict.feedback_type, "feedback_type"),
        original_message_id=_one_clean_line(verdict.original_message_id, "original_message_id"),
        original_envelope_from=_clean_address(verdict.original_envelope_from),
        original_headers=headers,
        reason=_one_clean_line(verdict.reason, "reason") or verdict.kind,
    )


def _one_clean_line(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    return " ".join(_CONTROL.sub(" ", text).split())[: _FIELD_LIMITS[name]] or None


def _clean_address(address: str | None) -> str | None:
    """An address as found, or None when it cannot be one: too long, or with a control character."""
    if not address or len(address) > MAX_ADDRESS_CHARS or _CONTROL.search(address) or "@" not in address:
        return None
    return address


def _parse(data: bytes, rules: BounceRules) -> FeedbackVerdict:
    msg = email.message_from_bytes(data, policy=compat32)
    parts = _parts(msg)
    dsn = next((p for p in parts if p.get_content_type() in _DSN_TYPES), None)
    if dsn is not None:
        return _dsn_verdict(msg, parts, dsn, rules)
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if report is not None:
        return _complaint_verdict(parts, report)
    from_mail_system = _is_from_mail_system(msg)
    auto_reply = None if from_mail_system else _auto_reply_reason(msg)
    if auto_reply:
        return FeedbackVerdict(kind="auto_reply", original_message_id=_in_reply_to(msg), reason=auto_reply)
    return _text_bounce_verdict(msg, parts, rules, from_mail_system)


# --- MIME -------------------------------------------------------------------------------------------------


def _parts(msg: Message) -> list[Message]:
    """Every part in document order, without descending into attached messages (the returned original)."""
    found: list[Message] = []
    stack = [(msg, 0)]
    while stack and len(found) < MAX_PARTS:
        part, depth = stack.pop()
        found.append(part)
        if part.get_content_maintype() == "multipart" and depth < MAX_DEPTH:
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((p, depth + 1) for p in reversed(payload[:MAX_PARTS]) if isinstance(p, Message))
    return found


def _header(msg: Message | None, name: str) -> str:
    """A header as one decoded line; "" when absent or too broken to read."""
    if msg is None:
        return ""
    try:
        value = msg.get(name)
        text = "" if value is None else str(value)
        if "=?" in text:
            text = str(make_header(decode_header(text)))
    except Exception:  # noqa: BLE001 - a broken header counts as absent
        return ""
    return " ".join(text.split())[:MAX_HEADER_CHARS]


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw[:MAX_TEXT_CHARS] if isinstance(raw, str) else ""
    payload = payload[: MAX_TEXT_CHARS * 4]
    try:
        text = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        text = payload.decode("utf-8", errors="replace")
    return text[:MAX_TEXT_CHARS]


def _readable_text(parts: list[Message]) -> str:
    """The human-readable report: the first text/plain part, else the first text/html one as text."""
    for wanted in ("text/plain", "text/html"):
        for part in parts:
            if part.get_content_type() == wanted and not part.get_filename():
                text = _decoded_text(part).replace("\r\n", "\n")
                return _html_to_text(text) if wanted == "text/html" else text
    return ""


def _html_to_text(text: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b[^>]*>.*?</\1\s*>", " ", text)
    text = re.sub(r"(?i)<br\s*/?>|</(p|div|tr|li|h\d|table)\s*>", "\n", text)
    return html.unescape(re.sub(r"<[^>]{0,2000}>", "", text))


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The field groups of a delivery-status or feedback-report part, names lower-cased, values unfolded."""
    payload = part.get_payload()
    blocks: list[dict[str, str]] = []
    if isinstance(payload, list):  # the email package parses each group as a header-only message
        for group in payload[:MAX_PARTS]:
            if isinstance(group, Message):
                blocks.append({name.lower(): _header(group, name) for name in group.keys()})
                body = group.get_payload()
                if isinstance(body, str) and body.strip():
                    blocks.extend(_parse_field_text(body[:MAX_TEXT_CHARS]))
    else:
        blocks = _parse_field_text(_decoded_text(part))
    return [block for block in blocks if block]


def _parse_field_text(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = [{}]
    name = None
    for line in text.replace("\r\n", "\n").split("\n")[:5000]:
        if not line.strip():
            blocks.append({})
            name = None
        elif line[0] in " \t" and name:
            blocks[-1][name] = f"{blocks[-1][name]} {line.strip()}"
        elif ":" in line:
            name, value = (piece.strip() for piece in line.split(":", 1))
            name = name.lower()
            blocks[-1].setdefault(name, value)
    return [{k: " ".join(v.split()) for k, v in block.items()} for block in blocks if block]


def _original_message(parts: list[Message]) -> Message | None:
    """The returned original (message/rfc822) or its headers (text/rfc822-headers), if attached."""
    for part in parts[1:]:
        if part.get_content_type() not in _ORIGINAL_TYPES:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        return email.message_from_string(_decoded_text(part).lstrip(), policy=compat32)
    return None


def _original_headers(original: Message | None) -> dict[str, str]:
    if original is None:
        return {}
    kept = {}
    for name in original.keys()[:500]:
        lower = name.lower()
        if (lower in _KEPT_HEADERS or lower.startswith("x-mtad-")) and lower not in kept and len(kept) < 30:
            kept[lower] = _header(original, name)
    return kept


# --- addresses --------------------------------------------------------------------------------------------


def _address(value: str | None) -> str | None:
    """'rfc822; <a@example.net>' or 'Name <a@example.net>' -> 'a@example.net'; None without an address."""
    if not value:
        return None
    if ";" in value and "@" not in value.split(";", 1)[0]:
        value = value.split(";", 1)[1]
    value = value.strip()
    _, parsed = parseaddr(value)
    candidate = parsed or value.strip("<> ")
    return candidate if "@" in candidate and " " not in candidate else None


def _first_address(value: str) -> str | None:
    try:
        found = [address for _, address in getaddresses([value]) if "@" in address]
    except Exception:  # noqa: BLE001 - an unparseable To names nobody
        return None
    return found[0] if found else None


def _is_from_mail_system(msg: Message) -> bool:
    name, address = parseaddr(_header(msg, "from"))
    local = address.split("@", 1)[0].lower()
    return local in _MAIL_SYSTEM_LOCAL_PARTS or local.startswith("microsoftexchange") or bool(
        _MAIL_SYSTEM_NAME.search(name)
    )


def _in_reply_to(msg: Message) -> str | None:
    for name in ("in-reply-to", "references"):
        found = _MESSAGE_ID.search(_header(msg, name))
        if found:
            return found.group(0)
    return None


# --- the verdicts -----------------------------------------------------------------------------------------


def _dsn_verdict(msg: Message, parts: list[Message], dsn: Message, rules: BounceRules) -> FeedbackVerdict:
    blocks = _field_blocks(dsn)
    per_message: dict[str, str] = {}
    if blocks and not ({"final-recipient", "original-recipient"} & set(blocks[0])):
        per_message, blocks = blocks[0], blocks[1:]
    reports = [_dsn_recipient(block, rules) for block in blocks[:MAX_PARTS]]
    recipients = tuple(report for report in reports if report is not None)
    original = _original_message(parts)
    reporter = _without_type(per_message.get("reporting-mta")) or "an MTA"
    reason = f"delivery status notification (RFC 3464) from {reporter}"
    if not recipients:  # a report without usable recipient fields: read its human-readable part instead
        text_verdict = _text_bounce_verdict(msg, parts, rules, from_mail_system=True)
        recipients, reason = text_verdict.recipients, f"{reason}, no recipient fields; {text_verdict.reason}"
    return FeedbackVerdict(
        kind="bounce",
        recipients=recipients,
        original_message_id=(
            _header(original, "message-id") or _gmail_original_id(per_message) or _in_reply_to(msg)
        ),
        original_envelope_from=_address(_header(original, "return-path"))
        or _address(per_message.get("x-postfix-sender"))
        or _first_address(_header(msg, "to")),
        original_headers=_original_headers(original),
        reason=f"{reason}: {len(recipients)} recipient(s)",
    )


def _gmail_original_id(per_message: dict[str, str]) -> str | None:
    found = _MESSAGE_ID.search(per_message.get("x-original-message-id", ""))  # Gmail's per-message field
    return found.group(0) if found else None


def _dsn_recipient(block: dict[str, str], rules: BounceRules) -> RecipientReport | None:
    # Original-Recipient is the address as mtad sent it; Final-Recipient may be an alias's target.
    recipient = _address(block.get("original-recipient")) or _address(block.get("final-recipient"))
    if recipient is None:
        return None
    status = (_BARE_STATUS.search(block.get("status", "")) or [None, None])[1]
    code, enhanced, text = split_reply(_without_type(block.get("diagnostic-code")))
    diagnostic = _one_line(code, enhanced, text)
    status = status or enhanced
    action = (block.get("action", "").split() or [""])[0].lower()
    if action not in ACTIONS:
        action = {"2": "delivered", "4": "delayed"}.get((status or "5")[0], "failed")
    verdict = classify_reply(rules, code, status, text)
    return RecipientReport(
        recipient=recipient,
        action=action,
        status=status,
        diagnostic=diagnostic,
        remote_mta=(_without_type(block.get("remote-mta")).split() or [""])[0].rstrip(".") or None,
        category=verdict.category,
        hard=verdict.hard and action == "failed",
    )


def _one_line(code: int | None, enhanced: str | None, text: str) -> str | None:
    """The reply as one line, multi-line prefixes gone: "550 5.1.1 The email account ... does not exist"."""
    return " ".join(str(part) for part in (code, enhanced, text) if part)[:1000] or None


def _without_type(value: str | None) -> str:
    """'smtp; 550 5.1.1 ...' -> '550 5.1.1 ...' (RFC 3464 diagnostic-type and mta-name-type)."""
    if not value:
        return ""
    kind, separator, rest = value.partition(";")
    return rest.strip() if separator and re.fullmatch(r"\s*[\w.-]{1,20}\s*", kind) else value.strip()


def _complaint_verdict(parts: list[Message], report: Message) -> FeedbackVerdict:
    fields: dict[str, str] = {}
    for block in _field_blocks(report):
        for name, value in block.items():
            fields.setdefault(name, value)
    original = _original_message(parts)
    recipient = (
        _address(fields.get("original-rcpt-to"))
        or _address(_header(original, "x-hmxmroriginalrecipient"))  # Microsoft JMRP
        or _first_address(_header(original, "to"))
    )
    feedback_type = (fields.get("feedback-type", "").split() or [None])[0]
    agent = fields.get("user-agent") or "unknown agent"
    return FeedbackVerdict(
        kind="complaint",
        complained_recipient=recipient,
        feedback_type=feedback_type.lower() if feedback_type else None,
        original_message_id=_header(original, "message-id") or None,
        original_envelope_from=(
            _address(fields.get("original-mail-from")) or _address(_header(original, "return-path"))
        ),
        original_headers=_original_headers(original),
        reason=f"feedback report (RFC 5965 ARF), Feedback-Type {feedback_type or 'missing'}, from {agent}"[:300],
    )


def _auto_reply_reason(msg: Message) -> str | None:
    submitted = _header(msg, "auto-submitted")
    if submitted and (submitted.split(";")[0].split() or ["no"])[0].lower() != "no":
        return f"auto-reply (Auto-Submitted: {submitted})"[:200]
    for name in _AUTO_HEADERS:
        value = _header(msg, name)
        if name in msg and value.lower() not in ("no", "false", "0"):
            return f"auto-reply ({name}: {value})"[:200]
    if _header(msg, "precedence").lower() == "auto_reply":
        return "auto-reply (Precedence: auto_reply)"
    subject = _header(msg, "subject")
    if _CHALLENGE_SUBJECT.search(subject) or "tmda" in _header(msg, "x-delivery-agent").lower():
        return f"challenge/response (subject {subject!r})"[:200]
    if _AUTO_SUBJECT.search(subject):
        return f"auto-reply (subject {subject!r})"[:200]
    return None


def _text_bounce_verdict(
    msg: Message, parts: list[Message], rules: BounceRules, from_mail_system: bool
) -> FeedbackVerdict:
    text = _readable_text(parts)
    cut = _ORIGINAL_CUT.search(text)
    report, copy = (text[: cut.start()], text[cut.end() :]) if cut else (text, "")
    signature = next((name for pattern, name in _SIGNATURES if pattern.search(report)), None)
    subject = _header(msg, "subject")
    if not (from_mail_system or signature or _BOUNCE_SUBJECT.search(subject)):
        return FeedbackVerdict(kind="unknown", reason="not a report, a bounce or an auto-reply")
    original = _original_message(parts)
    if original is None and copy.strip():
        original = email.message_from_string(copy.lstrip(" -\r\n")[:MAX_TEXT_CHARS], policy=compat32)
    envelope_from = _address(_header(original, "return-path")) or _first_address(_header(msg, "to"))
    # the envelope sender, the original's From and the mail system itself are never the failed recipient
    ignored = {a.lower() for a in (envelope_from, _first_address(_header(original, "from"))) if a}
    recipients, how = _text_recipients(report, ignored, _first_address(_header(original, "to")), rules)
    why = f"non-DSN bounce ({signature or 'mail system'} text{how})" if recipients else None
    if not recipients and not (from_mail_system or signature):
        why = f"bounce-like subject but no recipient in the text: {subject!r}"
        return FeedbackVerdict(kind="unknown", reason=why[:200])
    return FeedbackVerdict(
        kind="bounce",
        recipients=recipients,
        original_message_id=_header(original, "message-id") or _in_reply_to(msg),
        original_envelope_from=envelope_from,
        original_headers=_original_headers(original),
        reason=why or f"non-DSN bounce ({signature or 'mail system'} text) naming no recipient",
    )


def _text_recipients(
    report: str, ignored: set[str], original_to: str | None, rules: BounceRules
) -> tuple[tuple[RecipientReport, ...], str]:
    """Recipients of a text bounce: each address on a line of its own (or in "message to X couldn't be
    delivered", "RCPT TO:<X>") starts a block; the SMTP reply inside the block belongs to it."""
    report = report[:MAX_TEXT_CHARS]
    marks = [(m.start(), m.group(1)) for m in _ADDRESS_LINE.finditer(report)]
    marks += [(m.start(), m.group(1) or m.group(2)) for m in _ADDRESS_INLINE.finditer(report)]
    marks = sorted((start, address) for start, address in marks if not _is_ignored(address, ignored))
    blocks: dict[str, list[str]] = {}
    for index, (start, address) in enumerate(marks[:MAX_PARTS]):
        end = marks[index + 1][0] if index + 1 < len(marks) else len(report)
        blocks.setdefault(address.lower(), [address]).append(report[start:end])
    how = ""
    if not blocks and original_to and _reply_in(report):
        blocks, how = {original_to.lower(): [original_to, report]}, ", recipient from the returned message's To"
    permanent = bool(_PERMANENT.search(report))
    delayed = bool(_DELAYED.search(report)) and not permanent
    return tuple(_text_recipient(v[0], "\n".join(v[1:]), delayed, permanent, rules) for v in blocks.values()), how


def _is_ignored(address: str, ignored: set[str]) -> bool:
    lower = address.lower()
    return lower in ignored or lower.split("@", 1)[0] in _MAIL_SYSTEM_LOCAL_PARTS


def _text_recipient(address: str, block: str, delayed: bool, permanent: bool, rules: BounceRules) -> RecipientReport:
    reply = _reply_in(block)
    if reply is None:
        lines = [line.strip() for line in block.split("\n")[1:] if line.strip()]
        diagnostic = " ".join(lines[:4])[:300] or None
        code, enhanced, text = None, None, diagnostic or ""
    else:
        code, enhanced, text = split_reply(reply)
        diagnostic = _one_line(code, enhanced, text)
    found = _QMAIL_STATUS.search(block) or _BARE_STATUS.search(block)
    status = enhanced or (found.group(1) if found else None)
    remote = _REMOTE_HOST.search(block)
    action = "delayed" if delayed else "failed"
    verdict = classify_reply(rules, code, status, text)
    # words alone ("Unrouteable address") are hard only where the report calls the failure permanent
    definite = code is not None or status is not None or permanent
    return RecipientReport(
        recipient=address,
        action=action,
        status=status,
        diagnostic=diagnostic,
        remote_mta=next((g for g in remote.groups() if g), None) if remote else None,
        category=verdict.category,
        hard=verdict.hard and action == "failed" and definite,
    )


def _reply_in(block: str) -> str | None:
    """The first SMTP reply in a text, its multi-line continuations (RFC 5321 4.2.1) joined into one line."""
    match = _REPLY_WITH_ENHANCED.search(block) or _REPLY_CODE_ONLY.search(block)
    if not match:
        return None
    code = match.group(1)
    lines = block[match.start(1) :].split("\n")
    reply = [lines[0].strip()]
    for line in lines[1:20]:
        if not re.match(rf"\s*{code}[ -]", line) or not reply[-1].startswith(f"{code}-"):
            break
        reply.append(line.strip())
    return " ".join(" ".join(reply).strip(" '#").split())[:1000] or None

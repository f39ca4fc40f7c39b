"""The submitted message as bytes: line endings, header fields, and the headers mtad adds.

In:  the DATA content exactly as received (dot-unstuffed by aiosmtpd).
Out: CRLF-only content (a bare CR or LF would be rewritten by some hop later and break the DKIM signature
     made over it); the header fields as (lower-case name, unfolded value); the header lines mtad prepends:
     a Received trace field, and Message-ID and Date when the client left them out (RFC 6409 section 8).
Invariant: values written into headers never contain CR or LF, so nothing a client sends can inject a header.
"""

from __future__ import annotations

import email.utils
import re
from datetime import datetime
from functools import lru_cache

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]]")


def normalize_line_endings(content: bytes) -> bytes:
    crlf = content.count(b"\r\n")
    if crlf == content.count(b"\r") == content.count(b"\n"):
        return content  # already clean: the common case costs three C-speed counts
    return _ANY_LINE_END.sub(b"\r\n", content)


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, body); the blank line separating them belongs to the body."""
    if content.startswith(b"\r\n"):
        return b"", content
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 2 :]


def header_fields(header_block: bytes) -> list[tuple[str, str]]:
    """Unfolded header fields in order; a line that is neither a field nor a continuation is skipped."""
    fields: list[tuple[str, str]] = []
    for line in header_block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "surrogateescape"))
            continue
        match = _HEADER_NAME.match(line)
        if match:
            value = line[match.end() :].strip().decode("utf-8", "surrogateescape")
            fields.append((match.group(1).decode("ascii").lower(), value))
    return fields


def from_addresses(fields: list[tuple[str, str]]) -> list[str] | None:
    """The addr-specs of the one From field; None when there is no From field, or more than one."""
    values = [value for name, value in fields if name == "from"]
    if len(values) != 1:
        return None
    addresses = _addr_specs(values[0])
    return list(addresses) or None


@lru_cache(maxsize=1024)  # a campaign's From field is the same in every message: parse it once
def _addr_specs(value: str) -> tuple[str, ...]:
    return tuple(addr for _, addr in email.utils.getaddresses([value]) if addr)


def trace_headers(
    fields: list[tuple[str, str]],
    *,
    queue_id: str,
    hostname: str,
    helo: str | None,
    protocol: str,
    now: datetime,
) -> bytes:
    """Received, plus Message-ID and Date when missing. The client's IP is left out (privacy policy)."""
    names = {name for name, _ in fields}
    date = email.utils.format_datetime(now)
    helo_name = _HELO_SAFE.sub("", helo or "")[:255] or "unknown"
    lines = [f"Received: from {helo_name}\r\n\tby {hostname} (mtad) with {protocol} id {queue_id};\r\n\t{date}\r\n"]
    if "message-id" not in names:
        lines.append(f"Message-ID: <{queue_id}@{hostname}>\r\n")
    if "date" not in names:
        lines.append(f"Date: {date}\r\n")
    return "".join(lines).encode("ascii")


def without_fields(
    header_block: bytes, names: tuple[str, ...] = (), matcher: re.Pattern[bytes] | None = None
) -> bytes:
    """The header block without the fields named (lower case) or matched, continuation lines included."""
    kept: list[bytes] = []
    dropping = False
    for line in header_block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = _HEADER_NAME.match(line)
        dropping = bool(
            name and (name.group(1).decode("ascii").lower() in names or (matcher and matcher.match(line)))
        )
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept)

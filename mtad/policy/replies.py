"""RFC 3463 enhanced status codes for the replies aiosmtpd writes itself ("503 Error: need RCPT command").

mtad's own replies carry their enhanced code already; this gives every other 4xx/5xx one too, so a client
always gets a machine-readable reason, and aiosmtpd's own 2xx replies ("250 OK", "221 Bye", …) theirs, which
is what lets submission advertise ENHANCEDSTATUSCODES (RFC 2034). The greeting, the HELO/EHLO lines and
the 334/354 continuations take no enhanced code (RFC 2034 section 3): other 2xx and 3xx lines are left alone.
"""

from __future__ import annotations

import re

_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_BY_TEXT = (
    ("Line too long", "5.6.0"),
    ("Too much mail data", "5.3.4"),
    ("message size exceeds", "5.3.4"),
    ("Command line too long", "5.5.2"),
    ("Authentication required", "5.7.0"),
    ("lack of security", "5.7.0"),
    ("STARTTLS", "5.7.0"),
    ("Already authenticated", "5.5.1"),
)
_BY_CODE = {
    "421": "4.3.2",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.0",
    "554": "5.0.0",
    "555": "5.5.4",
}


# aiosmtpd's own success replies (RSET, NOOP, QUIT, STARTTLS, HELP, VRFY), by their whole text or its start
_SUCCESS_REPLIES = ("250 OK", "221 Bye", "220 Ready to start TLS")
_SUCCESS_PREFIXES = ("250 Syntax: ", "250 Supported commands: ", "252 Cannot VRFY user")


def with_enhanced_code(reply: str) -> str:
    """'503 Error: need RCPT command' -> '503 5.5.1 Error: need RCPT command', '221 Bye' -> '221 2.0.0 Bye';
    other lines unchanged."""
    if reply in _SUCCESS_REPLIES or reply.startswith(_SUCCESS_PREFIXES):
        return f"{reply[:3]} 2.0.0 {reply[4:]}"
    if len(reply) < 4 or reply[0] not in "45" or reply[3] not in " -" or _HAS_ENHANCED.match(reply):
        return reply
    code, separator, text = reply[:3], reply[3], reply[4:]
    enhanced = next((value for needle, value in _BY_TEXT if needle in text), None) or _BY_CODE.get(code)
    if enhanced is None:
        enhanced = f"{reply[0]}.0.0"
    elif enhanced[0] != reply[0]:  # a 4xx keeps a transient class even when the text matched a 5.x.x entry
        enhanced = reply[0] + enhanced[1:]
    return f"{code}{separator}{enhanced} {text}"

"""Envelope addresses: syntax, IDN and SMTPUTF8, via email-validator (no DNS: check_deliverability is off).

In:  the address text from MAIL FROM / RCPT TO (angle brackets already removed by aiosmtpd), and whether the
     client declared SMTPUTF8 for this transaction.
Out: `ParsedAddress` with the Unicode form for storage and the ASCII (A-label) domain for routing, or
     `AddressError` carrying the SMTP reply to give.
Refused: quoted local parts, IP literals, source routes ("@a:b@c") and "%"-hacks are not addresses a
marketing platform sends to, and refusing them closes the classic relay tricks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import email_validator
import idna
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, DOT_ATOM_TEXT, EMAIL_MAX_LENGTH


class AddressError(ValueError):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class ParsedAddress:
    address: str  # local@domain, domain lower-cased (Unicode form when the domain is an IDN)
    local_part: str
    domain: str  # Unicode form
    ascii_domain: str  # IDNA A-label form
    needs_smtputf8: bool  # the local part is not ASCII


def parse_address(text: str, *, smtputf8: bool, role: str) -> ParsedAddress:
    """`role` is "sender" or "recipient": it picks the enhanced code (5.1.7 / 5.1.3) of a syntax error."""
    bad_syntax = "553 5.1.7 Bad sender address syntax" if role == "sender" else "553 5.1.3 Bad recipient address syntax"
    if not text or any(ch in text for ch in "\r\n\0%") or text.startswith("@"):
        raise AddressError(bad_syntax)
    try:
        plain = _plain_address(text)
    except email_validator.EmailNotValidError:
        raise AddressError(bad_syntax) from None
    return plain if plain is not None else _validated_address(text, smtputf8, bad_syntax)


# A sender and its From header repeat for every message of a campaign: email-validator's parse was ~4 % of
# the daemon's CPU in a py-spy profile of benchmarks/relay.py. Refusals raise and so are never cached; plain
# addresses (every recipient, mostly) do not come here and so do not push the senders out.
@lru_cache(maxsize=4096)
def _validated_address(text: str, smtputf8: bool, bad_syntax: str) -> ParsedAddress:
    try:
        valid = _validate(text)
    except email_validator.EmailNotValidError:
        raise AddressError(bad_syntax) from None
    needs_smtputf8 = not valid.local_part.isascii()
    if needs_smtputf8 and not smtputf8:
        raise AddressError("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM")
    return ParsedAddress(
        address=f"{valid.local_part}@{valid.domain}",
        local_part=valid.local_part,
        domain=valid.domain,
        ascii_domain=valid.ascii_domain,
        needs_smtputf8=needs_smtputf8,
    )


def _validate(text: str) -> email_validator.ValidatedEmail:
    return email_validator.validate_email(
        text,
        check_deliverability=False,
        allow_smtputf8=True,
        allow_quoted_local=False,
        allow_domain_literal=False,
        allow_display_name=False,
        allow_empty_local=False,
        globally_deliverable=True,
    )


def _plain_address(text: str) -> ParsedAddress | None:
    """An ASCII dot-atom local part at a domain, checked as email-validator checks it but with the domain's
    IDNA work done once per domain: recipients differ, their domains repeat (email-validator per recipient was
    ~3 % of the daemon's event loop in a py-spy profile of benchmarks/relay.py). None: not that simple, ask
    email-validator. tests/unit/policy/test_addresses.py holds both ways to the same answers."""
    local, _, domain = text.rpartition("@")
    if not local.isascii() or not DOT_ATOM_TEXT.match(local) or local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        return None
    unicode_domain, ascii_domain = _domain_forms(domain)
    longest = max(len(text.encode()), len(f"{local}@{unicode_domain}".encode()), len(local) + 1 + len(ascii_domain))
    if longest > EMAIL_MAX_LENGTH:  # the three forms email-validator measures
        return None
    return ParsedAddress(f"{local}@{unicode_domain}", local, unicode_domain, ascii_domain, False)


@lru_cache(maxsize=4096)
def _domain_forms(domain: str) -> tuple[str, str]:
    valid = _validate(f"a@{domain}")
    return valid.domain, valid.ascii_domain


def is_within_domains(domain: str, owned: frozenset[str]) -> bool:
    """True when `domain` is one of `owned` or a subdomain of one (bounce.example.com under example.com)."""
    domain = domain.lower().rstrip(".")
    return any(domain == own or domain.endswith("." + own) for own in owned)


def to_ascii_domain(domain: str) -> str:
    """A domain as stored and compared: lower case, IDNA A-labels, no trailing dot."""
    cleaned = domain.strip().rstrip(".").lower()
    try:
        return idna.encode(cleaned, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise AddressError(f"553 5.1.2 Bad domain {domain!r}: {exc}") from None

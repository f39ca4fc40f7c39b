"""Admission of a submission transaction: who may send, as whom, to whom, how much.

In:  the session's identity (a tenant, or nobody), the MAIL/RCPT arguments, the From header's addresses,
     and limits from the settings.
Out: a parsed value to keep, or `Refusal` with the exact SMTP reply (RFC 3463 enhanced code included).
Invariant: nothing is accepted from a session without a tenant: there is no relay without authentication
(or an explicitly trusted network, which maps to one tenant).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtad.model import Tenant
from mtad.policy.addresses import AddressError, ParsedAddress, is_within_domains, parse_address

AUTH_REQUIRED = "530 5.7.0 Authentication required"


@dataclass(frozen=True)
class Refusal:
    reply: str


def admit_sender(tenant: Tenant | None, mail_from: str, *, smtputf8: bool) -> ParsedAddress | Refusal:
    if tenant is None:
        return Refusal(AUTH_REQUIRED)
    if not mail_from:
        return Refusal("550 5.7.1 A null sender is not accepted for submission; use one of your sending domains")
    try:
        sender = parse_address(mail_from, smtputf8=smtputf8, role="sender")
    except AddressError as exc:
        return Refusal(exc.reply)
    if not is_within_domains(sender.ascii_domain, tenant.domains):
        return Refusal(f"553 5.7.1 Sender domain {sender.ascii_domain} is not a sending domain of this account")
    return sender


def admit_recipient(
    tenant: Tenant | None, rcpt_to: str, *, smtputf8: bool, accepted_so_far: int, max_recipients: int
) -> ParsedAddress | Refusal:
    if tenant is None:
        return Refusal(AUTH_REQUIRED)
    if accepted_so_far >= max_recipients:
        # 452 asks the client to send the remaining recipients in another transaction (RFC 5321 4.5.3.1.10).
        return Refusal(f"452 4.5.3 Too many recipients (at most {max_recipients} per message)")
    try:
        return parse_address(rcpt_to, smtputf8=smtputf8, role="recipient")
    except AddressError as exc:
        return Refusal(exc.reply)


def admit_content(tenant: Tenant | None, from_header_domains: list[str] | None) -> Refusal | None:
    """The From header must exist and name only the tenant's own domains (what DMARC aligns on)."""
    if tenant is None:
        return Refusal(AUTH_REQUIRED)
    if not from_header_domains:
        return Refusal("550 5.6.0 Message has no valid From header")
    for domain in from_header_domains:
        if not is_within_domains(domain, tenant.domains):
            return Refusal(f"550 5.7.1 From header domain {domain} is not a sending domain of this account")
    return None


def from_header_domains(addresses: list[str] | None) -> list[str] | None:
    """ASCII domains of the From header's addresses; None if any of them is not a valid address."""
    if not addresses:
        return None
    domains = []
    for address in addresses:
        try:
            domains.append(parse_address(address, smtputf8=True, role="sender").ascii_domain)
        except AddressError:
            return None
    return domains

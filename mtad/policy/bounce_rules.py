"""Bounce classification as data (after KumoMTA's bounce_classifier/iana.toml and crates/bounce-classify).

In:  the parsed `config/bounce_rules.toml` (an ordered list of `[[rule]]` tables); then one remote reply as
     its code (550), enhanced status code ("5.1.1", RFC 3463) and text.
Out: `Classification(category, hard)`. `hard` means the address itself is bad and the caller suppresses it.

Rules are matched case-insensitively (`re.search`) against "code enhanced text", e.g.
"550 5.1.1 <a@example.net>: User unknown"; the first rule with a matching pattern wins. Patterns are
compiled once, when the document is parsed, and kept on the `BounceRules` value. When no rule matches, the
enhanced status code decides (`_BY_STATUS`, RFC 3463 subject.detail), then the reply class.
Invariants: a transient reply (4xx or 4.x.x) is never hard, whatever the rule says; a permanent reply mtad
does not understand is `other` and not hard, so an unknown 5xx never suppresses an address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

CATEGORIES = (
    "invalid_recipient",
    "mailbox_full",
    "domain_not_found",
    "policy_block",
    "rate_limited",
    "message_too_large",
    "dns_failure",
    "connection_failure",
    "auth_failure",
    "content_rejected",
    "other",
)
MAX_TEXT_CHARS = 2000  # regexes from a config file only ever see a bounded text
_RULE_KEYS = {"category", "hard", "patterns", "description"}
# RFC 3463 subject.detail -> (category, hard when the reply is permanent). x.7.x and x.6.x are by subject.
_BY_STATUS = {
    "1.1": ("invalid_recipient", True),  # bad destination mailbox address
    "1.3": ("invalid_recipient", True),  # bad destination mailbox address syntax
    "1.6": ("invalid_recipient", True),  # destination mailbox has moved, no forwarding address
    "1.10": ("invalid_recipient", True),  # Exchange RESOLVER.ADR.RecipientNotFound (RFC 7505 null MX too)
    "1.2": ("domain_not_found", True),  # bad destination system address
    "4.4": ("domain_not_found", True),  # unable to route (Postfix: host or domain name not found)
    "2.2": ("mailbox_full", False),
    "2.3": ("message_too_large", False),  # message length exceeds administrative limit
    "3.4": ("message_too_large", False),
    "4.1": ("connection_failure", False),  # no answer from host
    "4.2": ("connection_failure", False),  # bad connection
    "4.3": ("dns_failure", False),  # directory server failure
    **{f"7.{detail}": ("auth_failure", False) for detail in range(20, 27)},  # RFC 7372: DKIM, SPF, rDNS
}
_BY_SUBJECT = {"7": ("policy_block", False), "6": ("content_rejected", False)}
_ENHANCED = re.compile(r"^[245]\.(\d{1,3})\.(\d{1,3})$")
_REPLY = re.compile(
    r"^\s*(?P<code>[245]\d\d)(?:[ -]+|:\s*|$)(?:(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?=\s|$))?\s*(?P<text>.*)$",
    re.DOTALL,
)
_BARE_ENHANCED = re.compile(r"^\s*(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?=\s|$)\s*(?P<text>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Classification:
    category: str
    hard: bool


@dataclass(frozen=True)
class BounceRule:
    category: str
    hard: bool
    patterns: tuple[re.Pattern[str], ...]  # compiled once, IGNORECASE


@dataclass(frozen=True)
class BounceRules:
    rules: tuple[BounceRule, ...] = ()


def parse_bounce_rules(document: Mapping[str, Any]) -> BounceRules:
    """The compiled rules of a parsed bounce_rules.toml; ValueError naming the rule (1-based) and key."""
    if not isinstance(document, Mapping):
        raise ValueError("bounce rules: expected a table with [[rule]] entries")
    unknown = set(document) - {"rule"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown bounce rules section (expected [[rule]])")
    tables = document.get("rule", [])
    if not isinstance(tables, list):
        raise ValueError("rule: expected an array of tables ([[rule]])")
    return BounceRules(rules=tuple(_parse_rule(table, number) for number, table in enumerate(tables, 1)))


def _parse_rule(table: Any, number: int) -> BounceRule:
    where = f"rule {number}"
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table")
    unknown = set(table) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key (expected category, hard, patterns)")
    category = table.get("category")
    if category not in CATEGORIES:
        raise ValueError(f"{where}.category: {category!r} is not one of {', '.join(CATEGORIES)}")
    hard = table.get("hard")
    if not isinstance(hard, bool):
        raise ValueError(f"{where}.hard: expected true or false, got {hard!r}")
    patterns = table.get("patterns")
    if not isinstance(patterns, list) or not patterns:
        raise ValueError(f"{where}.patterns: expected a non-empty list of regular expressions")
    compiled = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{where}.patterns[{index}]: expected a non-empty string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"{where}.patterns[{index}]: not a valid regular expression: {exc}") from None
    return BounceRule(category=category, hard=hard, patterns=tuple(compiled))


def classify_reply(rules: BounceRules, code: int | None, enhanced: str | None, text: str) -> Classification:
    """First matching rule, else the enhanced status code, else `other`; never hard for a transient reply."""
    enhanced = enhanced if enhanced and _ENHANCED.match(enhanced) else None
    subject = " ".join(part for part in (str(code) if code else "", enhanced or "", text or "") if part)
    subject = " ".join(subject[:MAX_TEXT_CHARS].split())
    permanent = not is_transient(code, enhanced)
    for rule in rules.rules:
        if any(pattern.search(subject) for pattern in rule.patterns):
            return Classification(rule.category, rule.hard and permanent)
    category, hard = _by_status(enhanced)
    return Classification(category, hard and permanent)


def is_transient(code: int | None, enhanced: str | None) -> bool:
    """A 4xx reply or a 4.x.x status: the receiver may accept later, so it says nothing final."""
    return bool((code and 400 <= code < 500) or (enhanced and enhanced.startswith("4")))


def _by_status(enhanced: str | None) -> tuple[str, bool]:
    match = _ENHANCED.match(enhanced) if enhanced else None
    if not match:
        return "other", False
    subject, detail = match.group(1), match.group(2)
    return _BY_STATUS.get(f"{subject}.{detail}") or _BY_SUBJECT.get(subject) or ("other", False)


def split_reply(reply: str) -> tuple[int | None, str | None, str]:
    """'550-5.1.1 The email ... 550-5.1.1 double-checking ...' -> (550, "5.1.1", "The email ... double-checking ...").

    Multi-line replies (RFC 5321 4.2.1) arrive joined; their repeated "550-5.1.1 " prefixes are dropped.
    A reply without a leading code keeps its text; a leading bare "5.1.1" still counts as the enhanced code.
    """
    reply = reply or ""
    match = _REPLY.match(reply)
    if not match:
        bare = _BARE_ENHANCED.match(reply)
        if not bare:
            return None, None, " ".join(reply.split())
        return None, bare.group("enhanced"), " ".join(bare.group("text").split())
    code, enhanced, text = match.group("code"), match.group("enhanced"), match.group("text")
    if reply.lstrip()[3:4] == "-":  # multi-line: every line repeats the code (and the enhanced code)
        prefix = rf"{code}[ -]{re.escape(enhanced)}(?=\s|$)" if enhanced else rf"{code}[ -]"
        text = re.sub(rf"(?:^|\s){prefix}", " ", text)
    return int(code), enhanced, " ".join(text.split())

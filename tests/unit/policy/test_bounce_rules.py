"""config/bounce_rules.toml and mtad.policy.bounce_rules: tables of (reply line, category, hard)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.policy.bounce_rules import (
    CATEGORIES,
    BounceRules,
    Classification,
    classify_reply,
    parse_bounce_rules,
    split_reply,
)

RULES_FILE = Path(__file__).resolve().parents[3] / "config" / "bounce_rules.toml"


SHIPPED = parse_bounce_rules(tomllib.loads(RULES_FILE.read_text()))


@pytest.fixture
def rules() -> BounceRules:
    return SHIPPED


def classify_line(rules: BounceRules, line: str) -> Classification:
    return classify_reply(rules, *split_reply(line))


@pytest.mark.parametrize(
    ("line", "category", "hard"),
    [
        # the address is bad: hard
        ("550 5.1.1 <a@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
         "invalid_recipient", True),
        ("550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 "
         "double-checking the recipient's email address for typos or 550 5.1.1 https://support.google.com"
         "/mail/?p=NoSuchUser a1si2 - gsmtp", "invalid_recipient", True),
        ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient a@contoso.example not found by SMTP address lookup",
         "invalid_recipient", True),
        ("554: delivery error: dd This user doesn't have a yahoo.com account (a@yahoo.example) [0] - mta1.example",
         "invalid_recipient", True),
        ("550 5.1.1 <a@example.net>... User unknown", "invalid_recipient", True),
        ("5.1.1 Sorry, no mailbox here by that name. (#5.1.1)", "invalid_recipient", True),
        ("550 5.2.1 The email account that you tried to reach is disabled.", "invalid_recipient", True),
        ("550 Requested action not taken: No such user here", "invalid_recipient", True),
        ("550 5.1.2 Host unknown (Name server: nowhere.example: host not found)", "domain_not_found", True),
        ("5.4.4 Host or domain name not found. Name service error for name=x.example type=AAAA: Host not found",
         "domain_not_found", True),
        ("556 5.1.10 Recipient address has null MX", "domain_not_found", True),
        # the same words in a temporary reply are never hard
        ("450 4.1.1 <a@example.net>: Recipient address rejected: unverified address: User unknown",
         "invalid_recipient", False),
        ("450 4.1.2 <a@new.example>: Recipient address rejected: Domain not found", "domain_not_found", False),
        # full mailboxes may be emptied: soft
        ("552-5.2.2 The email account that you tried to reach is over quota. Please direct 552-5.2.2 the "
         "recipient to 552 5.2.2 https://support.google.com/mail/?p=OverQuotaTemp x - gsmtp", "mailbox_full", False),
        ("452 4.2.2 <a@example.org>: Mailbox is full", "mailbox_full", False),
        ("552 5.2.2 <a@example.org> Quota exceeded (mailbox for user is full)", "mailbox_full", False),
        ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
         "mailbox_full", False),
        ("552 5.3.4 Message size exceeds fixed limit", "message_too_large", False),
        ("552 5.2.3 Message length exceeds administrative limit", "message_too_large", False),
        # not the recipient's fault: never hard
        ("421-4.7.28 [192.0.2.10 15] Our system has detected an unusual rate of unsolicited mail originating "
         "from your IP address.", "rate_limited", False),
        ("421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user "
         "complaints - 4.16.55.1", "rate_limited", False),
        ("450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
         "messages from being delivered.", "rate_limited", False),
        ("452 4.5.3 Too many recipients", "rate_limited", False),
        ("550 5.7.1 TRANSPORT.RULES.RejectMessage; the message was rejected by organization policy",
         "policy_block", False),
        ("554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org",
         "policy_block", False),
        ("550 5.7.606 Access denied, banned sending IP [192.0.2.10].", "policy_block", False),
        ("554 5.7.9 Message not accepted for policy reasons.", "policy_block", False),
        ("550 SC-001 (BAY004-MC1F2) Unfortunately, messages from 192.0.2.10 weren't sent. Please contact your "
         "Internet service provider since part of their network is on our block list.", "policy_block", False),
        ("553 5.7.1 <news@news.example.com>: Sender address rejected: not owned by user", "policy_block", False),
        ("450 4.1.8 <b-x@bounces.example.com>: Sender address rejected: Domain not found", "policy_block", False),
        ("553 5.1.8 <b-x@bounces.example.com>... Domain of sender address b-x@bounces.example.com does not exist",
         "policy_block", False),
        ("550 5.7.1 Sender domain does not exist", "policy_block", False),
        ("550 Sender unknown", "policy_block", False),
        ("550 5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.10]", "policy_block", False),
        ("554 5.7.1 <a@example.net>: Relay access denied", "policy_block", False),
        ("550-5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all "
         "senders to authenticate with either SPF or DKIM.", "auth_failure", False),
        ("550 5.7.1 Email rejected per DMARC policy for news.example.com", "auth_failure", False),
        ("550 5.7.515 Access denied, sending domain news.example.com doesn't meet the required authentication "
         "level.", "auth_failure", False),
        ("550-5.7.1 Our system has detected that this message is likely unsolicited mail.", "content_rejected", False),
        ("554 5.7.0 Reject, id=11234 - INFECTED: Eicar-Test-Signature", "content_rejected", False),
        ("550 5.7.1 Message rejected: suspicious URL in message", "content_rejected", False),
        ("451 4.4.3 Host or domain name not found. Name service error for name=x.example type=MX: Host not "
         "found, try again", "dns_failure", False),
        ("4.4.1 connect to mx.example.net[192.0.2.1]:25: Connection timed out", "connection_failure", False),
        ("421 4.4.2 mx.example.net Error: timeout exceeded", "connection_failure", False),
        # what mtad does not understand is "other" and never suppresses an address
        ("550 5.5.0 Requested action not taken: mailbox unavailable", "other", False),
        ("550 Requested action not taken: mailbox unavailable", "other", False),
        ("554 5.0.0 Service unavailable", "other", False),
        ("451 4.3.0 Temporary local problem - please try later", "other", False),
        ("450 4.2.0 Greylisted, see https://postgrey.example/", "other", False),
    ],
)
def test_shipped_rules_classify_reply_lines(rules, line, category, hard):
    assert classify_line(rules, line) == Classification(category, hard)


@pytest.mark.parametrize(
    ("enhanced", "category", "hard"),
    [
        ("5.1.1", "invalid_recipient", True),
        ("5.1.10", "invalid_recipient", True),
        ("5.1.3", "invalid_recipient", True),
        ("5.1.2", "domain_not_found", True),
        ("5.4.4", "domain_not_found", True),
        ("5.2.2", "mailbox_full", False),
        ("4.2.2", "mailbox_full", False),
        ("5.3.4", "message_too_large", False),
        ("5.2.3", "message_too_large", False),
        ("5.7.1", "policy_block", False),
        ("4.7.0", "policy_block", False),
        ("5.7.23", "auth_failure", False),
        ("5.7.26", "auth_failure", False),
        ("4.4.1", "connection_failure", False),
        ("4.4.3", "dns_failure", False),
        ("5.6.0", "content_rejected", False),
        ("5.0.0", "other", False),
        ("4.0.0", "other", False),
        ("5.2.1", "other", False),
        (None, "other", False),
        ("not-a-status", "other", False),
    ],
)
def test_without_a_matching_rule_the_enhanced_status_code_decides(enhanced, category, hard):
    assert classify_reply(BounceRules(), None, enhanced, "") == Classification(category, hard)
    assert classify_reply(BounceRules(), None, enhanced, "some words no rule knows") == Classification(category, hard)


def test_an_unknown_permanent_reply_never_suppresses_an_address(rules):
    for code in range(500, 560):
        assert not classify_reply(rules, code, None, "something went wrong").hard


@pytest.mark.parametrize(
    ("code", "enhanced"), [(450, "4.1.1"), (550, "4.1.1"), (450, "5.1.1"), (450, None), (None, "4.1.1")]
)
def test_a_transient_reply_is_never_hard_even_when_the_rule_is(rules, code, enhanced):
    verdict = classify_reply(rules, code, enhanced, "User unknown")
    assert verdict == Classification("invalid_recipient", False)


def test_the_first_matching_rule_wins_and_matching_ignores_case():
    rules = parse_bounce_rules({"rule": [
        {"category": "policy_block", "hard": False, "patterns": ["blocked"]},
        {"category": "invalid_recipient", "hard": True, "patterns": ["user unknown", "blocked"]},
    ]})
    assert classify_reply(rules, 550, "5.1.1", "USER UNKNOWN, BLOCKED") == Classification("policy_block", False)
    assert classify_reply(rules, 550, "5.1.1", "User Unknown") == Classification("invalid_recipient", True)


def test_rules_match_the_code_and_enhanced_code_too():
    rules = parse_bounce_rules({"rule": [{"category": "rate_limited", "hard": False, "patterns": [r"^421 4\.7\.0 "]}]})
    assert classify_reply(rules, 421, "4.7.0", "Try later").category == "rate_limited"
    assert classify_reply(rules, 421, "4.7.1", "Try later").category == "policy_block"  # the x.7.x fallback


def test_patterns_are_compiled_once_when_the_rules_are_parsed(rules, monkeypatch):
    assert all(isinstance(p, re.Pattern) and p.flags & re.IGNORECASE for rule in rules.rules for p in rule.patterns)

    def no_compiling(*args, **kwargs):
        raise AssertionError("classify_reply compiled a pattern")

    monkeypatch.setattr(re, "compile", no_compiling)
    assert classify_reply(rules, 550, "5.1.1", "User unknown").category == "invalid_recipient"


def test_the_shipped_rules_use_known_categories_and_hard_only_for_a_bad_address(rules):
    assert rules.rules and {rule.category for rule in rules.rules} <= set(CATEGORIES)
    assert {rule.category for rule in rules.rules if rule.hard} == {"invalid_recipient", "domain_not_found"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"rules": []}, "rules: unknown bounce rules section"),
        ({"rule": {"category": "other"}}, "rule: expected an array of tables"),
        ({"rule": [{"category": "bogus", "hard": False, "patterns": ["x"]}]}, "rule 1.category: 'bogus' is not one of"),
        ({"rule": [{"category": "other", "hard": "yes", "patterns": ["x"]}]}, "rule 1.hard: expected true or false"),
        ({"rule": [{"category": "other", "hard": False, "patterns": []}]},
         "rule 1.patterns: expected a non-empty list"),
        ({"rule": [{"category": "other", "hard": False, "pattern": ["x"]}]}, "rule 1.pattern: unknown key"),
        (
            {"rule": [{"category": "other", "hard": False, "patterns": ["x"]},
                      {"category": "other", "hard": False, "patterns": ["ok", "(unclosed"]}]},
            "rule 2.patterns[1]: not a valid regular expression",
        ),
        ({"rule": [{"category": "other", "hard": False, "patterns": [42]}]},
         "rule 1.patterns[0]: expected a non-empty string"),
    ],
)
def test_a_bad_rules_document_names_the_rule_and_key(document, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_bounce_rules(document)


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("550 5.1.1 User unknown", (550, "5.1.1", "User unknown")),
        ("550-5.1.1 The email account 550-5.1.1 does not 550 5.1.1  exist",
         (550, "5.1.1", "The email account does not exist")),
        ("421-Too busy 421-try 421 later", (421, None, "Too busy try later")),
        ("554: delivery error: dd gone", (554, None, "delivery error: dd gone")),
        ("5.4.4 Host not found", (None, "5.4.4", "Host not found")),
        ("Connection timed out", (None, None, "Connection timed out")),
        ("", (None, None, "")),
        ("2024 was a good year", (None, None, "2024 was a good year")),
    ],
)
def test_split_reply_reads_code_enhanced_code_and_text(reply, parsed):
    assert split_reply(reply) == parsed


@given(code=st.one_of(st.none(), st.integers(0, 999)), enhanced=st.one_of(st.none(), st.text(max_size=12)),
       text=st.text(max_size=300))
def test_classify_reply_accepts_anything_and_a_4xx_is_never_hard(code, enhanced, text):
    verdict = classify_reply(SHIPPED, code, enhanced, text)
    assert verdict.category in CATEGORIES
    if code is not None and 400 <= code < 500:
        assert not verdict.hard


def test_a_long_reply_is_classified_on_a_bounded_prefix(rules):
    assert classify_reply(rules, 550, "5.1.1", "x" * 5_000_000 + " blocked").category == "invalid_recipient"

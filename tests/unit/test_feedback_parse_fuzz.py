"""Hypothesis over mtad.feedback.parse with structure-aware mutations of the real fixtures (tests/fixtures/bounces).

tests/unit/test_feedback_parse.py already checks that random, truncated and spliced input gives a verdict.
This module checks what comes out: every field typed and bounded, and no string that could not be stored
or logged as it is. A verdict's strings go into PostgreSQL text columns (a NUL is refused there: the whole
report would be lost), into log lines and into SMTP-facing event rows, so none carries NUL, CR, LF or other
control characters, and none is longer than the limits below, whatever the remote side wrote.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtad.feedback.parse import (
    ACTIONS,
    MAX_HEADER_CHARS,
    MAX_PARTS,
    FeedbackVerdict,
    RecipientReport,
    load_bounce_rules,
    parse_feedback,
)
from mtad.policy.bounce_rules import CATEGORIES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
FIXTURE_BYTES = [path.read_bytes() for path in sorted(FIXTURES.glob("*.eml"))]
RULES = load_bounce_rules(None)
KINDS = {"bounce", "complaint", "auto_reply", "unknown"}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
LIMITS = {  # the longest value each field may have
    "recipient": 320,
    "status": 11,
    "diagnostic": 1000,
    "remote_mta": 255,
    "complained_recipient": 320,
    "feedback_type": 64,
    "original_message_id": MAX_HEADER_CHARS,
    "original_envelope_from": 320,
    "reason": 300,
}

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Field lines a hostile or broken report might carry, each a way to push junk into one verdict field.
HOSTILE_FIELDS = [
    b"Final-Recipient: rfc822; a\x00b@example.net",
    b"Original-Recipient: rfc822;" + b"x" * 5000 + b"@example.net",
    b"Final-Recipient: rfc822; <victim@example.net>\rBcc: other@example.net",
    b"Action: failed\x00",
    b"Action: " + b"f" * 3000,
    b"Status: 5.1.1\x1b[31m",
    b"Status: 9.99.9999",
    b"Diagnostic-Code: smtp; 550 5.1.1 \x00\x07 user unknown",
    b"Diagnostic-Code: smtp; 550 " + b"d" * 20_000,
    b"Remote-MTA: dns; " + b"m" * 5000,
    b"Remote-MTA: dns; mx\x00.example.net",
    b"Reporting-MTA: dns; " + b"r" * 5000,
    b"Feedback-Type: abuse\x00injected",
    b"Feedback-Type: " + b"t" * 5000,
    b"Original-Rcpt-To: " + b"v" * 5000 + b"@example.net",
    b"Original-Rcpt-To: a\x00@example.net",
    b"Original-Mail-From: <b-\x00x@bounces.example>",
    b"User-Agent: " + b"u" * 5000,
    b"X-Postfix-Sender: rfc822; " + b"s" * 5000 + b"@example.net",
    b"Return-Path: <" + b"p" * 5000 + b"@example.net>",
    b"Message-ID: <id\x00@example.net>",
    b"Subject: =?utf-8?b?AAECAwQFBgcICQoLDA0ODw==?=",
    b"Subject: =?utf-8?q?Undelivered_=00=0D=0A_mail?=",
    b"From: Mail Delivery System <MAILER-DAEMON@x.example>",
    b"Content-Type: message/delivery-status",
    b"Content-Type: message/feedback-report",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"",
    b"Content-Transfer-Encoding: base64",
    b"Content-Type: text/plain; charset=\"utf-7\"",
    b"X-Mtad-Queue-Id: Q\x00\x01",
]


@st.composite
def mutated_fixture(draw) -> bytes:
    lines = draw(st.sampled_from(FIXTURE_BYTES)).split(b"\n")
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(lines)))
        operation = draw(st.sampled_from(["insert", "replace", "delete", "duplicate"]))
        line = draw(st.one_of(st.sampled_from(HOSTILE_FIELDS), st.binary(max_size=80)))
        if operation == "insert":
            lines.insert(at, line)
        elif at < len(lines):
            if operation == "replace":
                name = lines[at].split(b":", 1)[0]
                lines[at] = name + b":" + line.split(b":", 1)[-1]
            elif operation == "delete":
                del lines[at]
            else:
                lines[at:at] = [lines[at]] * draw(st.integers(1, 200))
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return ending.join(line.rstrip(b"\r") for line in lines)


def check_bounded(verdict: FeedbackVerdict) -> None:
    assert isinstance(verdict, FeedbackVerdict) and verdict.kind in KINDS and verdict.reason
    assert isinstance(verdict.recipients, tuple) and len(verdict.recipients) <= MAX_PARTS
    for report in verdict.recipients:
        assert isinstance(report, RecipientReport)
        assert report.action in ACTIONS and report.category in CATEGORIES and isinstance(report.hard, bool)
        assert not (report.hard and report.action != "failed")
        assert "@" in report.recipient
        assert report.status is None or STATUS.fullmatch(report.status), report.status
        check_strings(report)
    assert isinstance(verdict.original_headers, dict) and len(verdict.original_headers) <= 30
    for name, value in verdict.original_headers.items():
        assert isinstance(name, str) and isinstance(value, str) and len(value) <= MAX_HEADER_CHARS
        assert not CONTROL.search(name) and not CONTROL.search(value), (name, value)
    check_strings(verdict)


def check_strings(value: FeedbackVerdict | RecipientReport) -> None:
    for field in fields(value):
        text = getattr(value, field.name)
        if field.name in LIMITS and text is not None:
            assert isinstance(text, str), (field.name, text)
            assert len(text) <= LIMITS[field.name], (field.name, len(text))
            assert not CONTROL.search(text), (field.name, text[:200])


@fuzz
@given(mutated_fixture())
def test_mutated_fixtures_give_typed_bounded_verdicts(message):
    check_bounded(parse_feedback(message, RULES))


@fuzz
@given(st.lists(st.sampled_from(HOSTILE_FIELDS), min_size=1, max_size=12), st.sampled_from(
    [b"multipart/report; report-type=delivery-status", b"multipart/report; report-type=feedback-report"]))
def test_hand_built_reports_from_hostile_fields_give_typed_bounded_verdicts(field_lines, report_type):
    """A minimal report whose every machine-readable field is one of the hostile lines."""
    kind = b"delivery-status" if b"delivery" in report_type else b"feedback-report"
    message = (
        b"From: MAILER-DAEMON@remote.example\r\nSubject: Undelivered Mail\r\nContent-Type: " + report_type
        + b"; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--B\r\n"
        + b"Content-Type: message/" + kind + b"\r\n\r\n" + b"\r\n".join(field_lines) + b"\r\n\r\n"
        + b"\r\n".join(field_lines) + b"\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        + b"\r\n".join(field_lines) + b"\r\n--B--\r\n"
    )
    check_bounded(parse_feedback(message, RULES))


def test_every_fixture_gives_a_typed_bounded_verdict():
    for message in FIXTURE_BYTES:
        check_bounded(parse_feedback(message, RULES))

"""mtad.feedback.parse over a corpus of real-world-shaped bounces, complaints and auto-replies (tests/fixtures/bounces).

Every fixture has its expected verdict here; a new fixture without one fails the suite.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtad.feedback.parse import (
    ACTIONS,
    DEFAULT_RULES_PATH,
    MAX_MESSAGE_BYTES,
    FeedbackVerdict,
    RecipientReport,
    load_bounce_rules,
    parse_feedback,
)
from mtad.policy.bounce_rules import CATEGORIES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
RULES = load_bounce_rules(None)
KINDS = {"bounce", "complaint", "auto_reply", "unknown"}


def verp(token: str) -> str:
    return f"b-{token}@bounces.example.com"


def mid(queue_id: str) -> str:
    return f"<{queue_id}.1@news.example.com>"


# file -> (kind, [(recipient, action, status, category, hard)], extra expectations)
EXPECTED = {
    "postfix_user_unknown.eml": ("bounce", [("alice@example.net", "failed", "5.1.1", "invalid_recipient", True)],
        {"message_id": mid("06DBD5Z800000C1S"), "queue_id": "06DBD5Z800000C1S",
         "envelope_from": verp("aaaaabyaaaaaaaab4jakellwnt6tjzaefusqkda")}),
    "postfix_delayed_connection_timeout.eml": ("bounce",
        [("bob@example.org", "delayed", "4.4.1", "connection_failure", False)],
        {"message_id": mid("06DBD5Z800000C1T"), "queue_id": "06DBD5Z800000C1T",
         "envelope_from": verp("aaaaacyaaaaaaaab5xw2dqkf7oqzaq2mrl3hsbe")}),  # from X-Postfix-Sender
    "postfix_mailbox_full.eml": ("bounce", [("carol.doe@example.org", "failed", "5.2.2", "mailbox_full", False)],
        {"queue_id": "06DBD5Z800000C1V"}),
    "postfix_domain_not_found.eml": ("bounce",
        [("mike@no-such-domain.example", "failed", "5.4.4", "domain_not_found", True)],
        {"queue_id": "06DBD5Z800000C27"}),
    "postfix_message_too_large.eml": ("bounce",
        [("oscar@example.com", "failed", "5.3.4", "message_too_large", False)], {"queue_id": "06DBD5Z800000C29"}),
    "exim_user_unknown.eml": ("bounce", [("dave@example.org", "failed", "5.1.1", "invalid_recipient", True)],
        {"message_id": mid("06DBD5Z800000C1W"), "queue_id": "06DBD5Z800000C1W",
         "envelope_from": verp("aaaaaeyaaaaaaaab7qh3vmzo2dkx6ljyf4cwuna")}),
    "exim_delayed_mailbox_full.eml": ("bounce", [("erin@example.org", "delayed", "4.2.2", "mailbox_full", False)],
        {"message_id": mid("06DBD5Z800000C1X")}),  # no copy of the message: its References name it
    "sendmail_user_unknown.eml": ("bounce", [("frank@example.net", "failed", "5.1.1", "invalid_recipient", True)],
        {"queue_id": "06DBD5Z800000C1Y", "envelope_from": verp("aaaaafyaaaaaaaab6twk3ybq4dn7xmcsezfoa2l")}),
    "sendmail_delayed_yahoo_tss04.eml": ("bounce",
        [("grace@yahoo.example", "delayed", "4.7.0", "rate_limited", False)], {"queue_id": "06DBD5Z800000C1Z"}),
    "sendmail_host_unknown.eml": ("bounce",
        [("nora@nowhere.example", "failed", "5.1.2", "domain_not_found", True)], {"queue_id": "06DBD5Z800000C28"}),
    "office365_recipient_not_found.eml": ("bounce",
        [("grace.hall@contoso.example", "failed", "5.1.10", "invalid_recipient", True)],
        {"queue_id": "06DBD5Z800000C20", "envelope_from": verp("aaaaagiaaaaaaaab5cqx2rwm7ynf3kdvo6zhtia")}),
    "exchange_blocked_by_policy.eml": ("bounce",
        [("heidi@fabrikam.example", "failed", "5.7.1", "policy_block", False)], {"queue_id": "06DBD5Z800000C21"}),
    "gmail_account_does_not_exist.eml": ("bounce",
        [("ivan.nobody@gmail.example", "failed", "5.1.1", "invalid_recipient", True)],
        {"queue_id": "06DBD5Z800000C22", "envelope_from": verp("aaaaagyaaaaaaaab7dkw2xzq5mfh4ctnvj6ruoe")}),
    "gmail_over_quota_plaintext.eml": ("bounce",
        [("judy.full@gmail.example", "failed", "5.2.2", "mailbox_full", False)], {"queue_id": "06DBD5Z800000C23"}),
    "gmail_rate_limited_delayed.eml": ("bounce",
        [("kim@workspace.example", "delayed", "4.7.28", "rate_limited", False)], {"queue_id": "06DBD5Z800000C24"}),
    "yahoo_user_not_found.eml": ("bounce",
        [("liam.gone@yahoo.example", "failed", None, "invalid_recipient", True)],
        {"queue_id": "06DBD5Z800000C25", "envelope_from": verp("aaaaahqaaaaaaaab2wmy5qkc6dtv3rhxo7znfli")}),
    "qmail_two_recipients.eml": ("bounce", [
        ("ken@example.net", "failed", "5.1.1", "invalid_recipient", True),
        ("lena@example.org", "failed", "5.1.1", "invalid_recipient", True),
    ], {"queue_id": "06DBD5Z800000C26"}),
    "dsn_broken_mime_unterminated.eml": ("bounce",
        [("wendy@example.org", "failed", "5.1.1", "invalid_recipient", True)], {"queue_id": "06DBD5Z800000C34"}),
    "arf_abuse_complaint.eml": ("complaint", [],
        {"complained": "mia@isp.example", "feedback_type": "abuse", "message_id": mid("06DBD5Z800000C2A"),
         "queue_id": "06DBD5Z800000C2A", "envelope_from": verp("aaaaaiyaaaaaaaab4hdv7qwz2nkc5ymtr6xfjou")}),
    "arf_yahoo_cfl_headers_only.eml": ("complaint", [],
        {"complained": "noah@yahoo.example", "feedback_type": "abuse", "queue_id": "06DBD5Z800000C2B",
         "envelope_from": verp("aaaaajaaaaaaaaab6mcx3qvz5nkt2yhdr7wfjle")}),
    "arf_microsoft_jmrp.eml": ("complaint", [],  # no Original-Rcpt-To: X-HmXmrOriginalRecipient of the original
        {"complained": "olivia@hotmail.example", "feedback_type": "abuse", "queue_id": "06DBD5Z800000C2C",
         "envelope_from": None}),
    "auto_reply_outlook_automatic_reply.eml": ("auto_reply", [], {"message_id": mid("06DBD5Z800000C2D")}),
    "auto_reply_out_of_office_x_autoreply.eml": ("auto_reply", [], {}),
    "auto_reply_sieve_vacation.eml": ("auto_reply", [], {"message_id": mid("06DBD5Z800000C2F")}),
    "auto_reply_dutch_afwezigheidsbericht.eml": ("auto_reply", [], {}),
    "auto_reply_german_abwesenheitsnotiz.eml": ("auto_reply", [], {}),
    "challenge_response.eml": ("auto_reply", [], {"reason": "challenge/response"}),
    "human_reply_not_a_bounce.eml": ("unknown", [], {}),
}


def parse(name: str) -> FeedbackVerdict:
    return parse_feedback((FIXTURES / name).read_bytes(), RULES)


def test_every_fixture_has_an_expected_verdict():
    assert sorted(p.name for p in FIXTURES.glob("*.eml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_is_read_as_expected(name):
    kind, recipients, extra = EXPECTED[name]
    verdict = parse(name)
    assert verdict.kind == kind, verdict.reason
    assert [(r.recipient, r.action, r.status, r.category, r.hard) for r in verdict.recipients] == recipients
    assert verdict.reason and "\n" not in verdict.reason
    if "complained" in extra:
        assert verdict.complained_recipient == extra["complained"]
        assert verdict.feedback_type == extra["feedback_type"]
    else:
        assert verdict.complained_recipient is None and verdict.feedback_type is None
    if "message_id" in extra:
        assert verdict.original_message_id == extra["message_id"]
    if "queue_id" in extra:
        assert verdict.original_headers["x-mtad-queue-id"] == extra["queue_id"]
        assert verdict.original_message_id == mid(extra["queue_id"])
    if "envelope_from" in extra:
        assert verdict.original_envelope_from == extra["envelope_from"]
    if "reason" in extra:
        assert extra["reason"] in verdict.reason


def test_every_bounce_names_the_remote_reply_and_every_recipient_is_well_formed():
    for name, (kind, _, _) in EXPECTED.items():
        for report in parse(name).recipients:
            assert report.action in ACTIONS and report.category in CATEGORIES, name
            assert report.diagnostic and "\n" not in report.diagnostic, name
            assert not (report.hard and report.action != "failed"), name


def test_a_complaint_keeps_the_list_unsubscribe_link_of_the_original():
    # mtad's per-recipient token is in it: a complaint without Original-Mail-From can still be matched
    headers = parse("arf_abuse_complaint.eml").original_headers
    assert headers["list-unsubscribe"] == "<https://unsub.example.com/u/aaaaaiyaaaaaaaab4hdv7qwz2nkc5ymtr6xfjou>"


def test_gmail_multi_line_replies_become_one_line_without_the_repeated_codes():
    (report,) = parse("gmail_account_does_not_exist.eml").recipients
    assert report.diagnostic.startswith("550 5.1.1 The email account that you tried to reach does not exist.")
    assert "550-5.1.1" not in report.diagnostic and report.remote_mta == "gmail-smtp-in.l.google.example"


def test_a_delivery_status_report_wins_over_auto_reply_headers():
    message = (FIXTURES / "postfix_user_unknown.eml").read_bytes().replace(
        b"Subject: Undelivered Mail Returned to Sender",
        b"Subject: Out of Office\nX-Autoreply: yes\nPrecedence: auto_reply",
    )
    assert parse_feedback(message, RULES).kind == "bounce"


def test_an_auto_reply_that_quotes_a_bounce_is_still_an_auto_reply():
    message = (
        b"From: Paul <paul@example.net>\nTo: b-x@bounces.example.com\nSubject: Automatic reply: Spring sale\n"
        b"Auto-Submitted: auto-replied\n\nI am away. PS: This message was created automatically by mail delivery"
        b" software. The following address(es) failed:\n\n  someone@example.net\n    550 5.1.1 User unknown\n"
    )
    verdict = parse_feedback(message, RULES)
    assert verdict.kind == "auto_reply" and verdict.recipients == ()


def test_the_mail_system_s_own_auto_submitted_header_does_not_make_a_bounce_an_auto_reply():
    # Exim and Postfix put Auto-Submitted: auto-replied on every bounce they send.
    message = (FIXTURES / "exim_user_unknown.eml").read_bytes()
    assert b"Auto-Submitted: auto-replied" in message and parse_feedback(message, RULES).kind == "bounce"


def test_original_recipient_is_the_address_mtad_sent_to_when_an_alias_was_expanded():
    message = (FIXTURES / "postfix_user_unknown.eml").read_bytes().replace(
        b"Final-Recipient: rfc822; alice@example.net\nOriginal-Recipient: rfc822;alice@example.net",
        b"Final-Recipient: rfc822; alice.internal@corp.example.net\nOriginal-Recipient: rfc822;alice@example.net",
    )
    assert [r.recipient for r in parse_feedback(message, RULES).recipients] == ["alice@example.net"]


def test_a_dsn_status_wins_over_the_enhanced_code_in_the_diagnostic():
    message = (FIXTURES / "postfix_user_unknown.eml").read_bytes().replace(b"Status: 5.1.1", b"Status: 4.2.0")
    (report,) = parse_feedback(message, RULES).recipients
    assert report.status == "4.2.0" and not report.hard


def test_a_delayed_recipient_is_never_hard():
    message = (FIXTURES / "postfix_user_unknown.eml").read_bytes().replace(b"Action: failed", b"Action: delayed")
    (report,) = parse_feedback(message, RULES).recipients
    assert report.action == "delayed" and report.category == "invalid_recipient" and not report.hard


def test_a_dsn_without_recipient_fields_falls_back_to_its_text():
    message = (FIXTURES / "qmail_two_recipients.eml").read_bytes().replace(
        b"Subject: failure notice",
        b"Subject: failure notice\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b",
    ).replace(b"\n\nHi. This", b"\n\n--b\nContent-Type: text/plain\n\nHi. This", 1) + (
        b"\n--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mail.example.net\n\n--b--\n"
    )
    verdict = parse_feedback(message, RULES)
    assert verdict.kind == "bounce"
    assert [r.recipient for r in verdict.recipients] == ["ken@example.net", "lena@example.org"]
    assert "no recipient fields" in verdict.reason


def test_custom_rules_from_a_file_change_the_classification(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\ncategory = \"other\"\nhard = false\npatterns = ['user unknown']\n")
    (report,) = parse_feedback((FIXTURES / "postfix_user_unknown.eml").read_bytes(), load_bounce_rules(path)).recipients
    assert (report.category, report.hard) == ("other", False)


def test_load_bounce_rules_names_the_file_and_the_rule(tmp_path):
    assert DEFAULT_RULES_PATH.name == "bounce_rules.toml" and DEFAULT_RULES_PATH.parent.name == "config"
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\ncategory = \"nope\"\nhard = false\npatterns = ['x']\n")
    with pytest.raises(ValueError, match=r"rules\.toml: rule 1\.category"):
        load_bounce_rules(path)
    path.write_text("[[rule]\n")
    with pytest.raises(ValueError, match=r"rules\.toml: "):
        load_bounce_rules(path)
    with pytest.raises(OSError):
        load_bounce_rules(tmp_path / "missing.toml")


def check(verdict: FeedbackVerdict) -> None:
    assert isinstance(verdict, FeedbackVerdict) and verdict.kind in KINDS and verdict.reason
    for report in verdict.recipients:
        assert isinstance(report, RecipientReport) and report.action in ACTIONS and report.category in CATEGORIES
        assert not (report.hard and report.action != "failed")


FIXTURE_BYTES = [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=4000))
def test_random_bytes_give_a_verdict(data):
    check(parse_feedback(data, RULES))


@fuzz
@given(st.sampled_from(FIXTURE_BYTES), st.floats(0, 1))
def test_truncated_fixtures_give_a_verdict(message, fraction):
    check(parse_feedback(message[: int(len(message) * fraction)], RULES))


@fuzz
@given(st.sampled_from(FIXTURE_BYTES), st.lists(st.tuples(st.floats(0, 1), st.binary(max_size=40)), max_size=8),
       st.lists(st.tuples(st.floats(0, 1), st.integers(0, 200)), max_size=4))
def test_mutated_fixtures_give_a_verdict(message, insertions, deletions):
    data = bytearray(message)
    for where, blob in insertions:
        at = int(len(data) * where)
        data[at:at] = blob
    for where, length in deletions:
        at = int(len(data) * where)
        del data[at : at + length]
    check(parse_feedback(bytes(data), RULES))


@pytest.mark.parametrize(
    "message",
    [
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\n\n"
        + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 5000,
        b"Content-Type: message/delivery-status\n\n"
        + b"Final-Recipient: rfc822; a@example.net\nAction: failed\n\n" * 20000,
        b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n\n" + b"<a@example.net>:\n550 5.1.1 no\n" * 100000,
        b"Subject: " + b"A" * 3_000_000 + b"\n\n" + b"x" * 3_000_000,
        b"Content-Type: text/plain; charset=no-such-charset\nContent-Transfer-Encoding: base64\n\n!!!notbase64",
        b"Content-Type: text/plain; charset=idna\nAuto-Submitted: ;\nX-Autoreply:\n\n\xff\xfe\x00",
        "Subject: =?utf-8?q?Abwesenheitsnotiz?=\n\nä".encode("latin-1"),
    ],
    ids=["deep-nesting", "many-recipient-groups", "many-text-recipients", "huge-lines", "bad-charset",
         "odd-headers", "latin1-bytes"],
)
def test_hostile_messages_give_a_verdict_quickly(message):
    started = time.monotonic()
    check(parse_feedback(message, RULES))
    assert time.monotonic() - started < 5


def test_only_the_first_megabyte_is_read():
    message = (FIXTURES / "postfix_user_unknown.eml").read_bytes()
    padded = message.replace(b"This is a MIME-encapsulated message.", b"x" * (MAX_MESSAGE_BYTES + 10))
    verdict = parse_feedback(padded, RULES)
    check(verdict)
    assert verdict.recipients == ()  # the report parts lie beyond the first megabyte

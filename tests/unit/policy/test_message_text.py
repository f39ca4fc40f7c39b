from datetime import datetime, timezone

import pytest

from mtad.policy.message_text import (
    from_addresses,
    header_fields,
    normalize_line_endings,
    split_message,
    trace_headers,
)

NOW = datetime(2026, 11, 25, 9, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb\n\r\n", b"a\r\n\r\nb\r\n\r\n"),
        (b"x\n.\ny\r\n", b"x\r\n.\r\ny\r\n"),
        (b"", b""),
    ],
)
def test_bare_cr_and_lf_become_crlf(raw, clean):
    assert normalize_line_endings(raw) == clean


def test_header_fields_are_unfolded_and_named_in_lower_case():
    header, body = split_message(b"From: A <a@x.example>\r\nSubject: one\r\n two\r\n\r\nbody\r\n")
    assert body == b"\r\nbody\r\n"
    assert header_fields(header) == [("from", "A <a@x.example>"), ("subject", "one two")]


def test_from_addresses_requires_exactly_one_from_field():
    assert from_addresses([("from", '"Acme" <news@acme.example>, b@acme.example')]) == [
        "news@acme.example",
        "b@acme.example",
    ]
    assert from_addresses([("subject", "hi")]) is None
    assert from_addresses([("from", "a@x.example"), ("from", "b@y.example")]) is None


def test_trace_headers_add_received_and_missing_message_id_and_date():
    added = trace_headers([("from", "a@x")], queue_id="Q1", hostname="mta.example", helo="app1", protocol="ESMTPSA", now=NOW)
    text = added.decode()
    assert text.startswith("Received: from app1\r\n\tby mta.example (mtad) with ESMTPSA id Q1;")
    assert "Message-ID: <Q1@mta.example>\r\n" in text
    assert "Date: Wed, 25 Nov 2026 09:30:00 +0000\r\n" in text


def test_trace_headers_keep_the_clients_message_id_and_date():
    fields = [("message-id", "<x@y>"), ("date", "Tue, 24 Nov 2026 10:00:00 +0000")]
    text = trace_headers(fields, queue_id="Q", hostname="h", helo="a", protocol="ESMTPSA", now=NOW).decode()
    assert "Message-ID" not in text and "\r\nDate:" not in text


def test_a_hostile_helo_cannot_inject_a_header():
    text = trace_headers([], queue_id="Q", hostname="h", helo="evil\r\nBcc: victim@x", protocol="ESMTP", now=NOW)
    lines = text.decode().split("\r\n")
    assert not any(line.startswith("Bcc") for line in lines)
    assert lines[0] == "Received: from evilBcc:victimx"

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from mtad.policy.dkim_headers import OVERSIGNED_HEADERS, SIGNED_HEADERS, select_signed_headers


def test_from_is_signed_even_when_the_message_has_no_from_field():
    assert "from" in select_signed_headers(["Subject", "To"])


def test_present_fields_are_listed_in_message_order_then_the_oversigned_names():
    names = select_signed_headers(["Received", "From", "To", "Subject", "Date", "Message-ID", "List-Id"])
    assert names[:6] == ("from", "to", "subject", "date", "message-id", "list-id")
    assert names[6:] == OVERSIGNED_HEADERS


def test_an_oversigned_field_is_listed_once_more_than_it_occurs():
    counts = Counter(select_signed_headers(["From", "To", "To", "Subject"]))
    assert counts["from"] == 2 and counts["subject"] == 2 and counts["to"] == 3


def test_an_absent_oversigned_field_is_listed_once_so_it_cannot_be_added():
    counts = Counter(select_signed_headers(["From", "Subject"]))
    assert counts["reply-to"] == 1 and counts["cc"] == 1 and counts["list-unsubscribe"] == 1


def test_list_unsubscribe_fields_are_signed_when_present():
    counts = Counter(select_signed_headers(["From", "List-Unsubscribe", "List-Unsubscribe-Post"]))
    assert counts["list-unsubscribe"] == 2 and counts["list-unsubscribe-post"] == 2


def test_fields_that_are_not_oversigned_are_listed_once_per_occurrence():
    counts = Counter(select_signed_headers(["From", "References", "In-Reply-To", "Feedback-ID", "Sender", "List-Id"]))
    assert [counts[name] for name in ("references", "in-reply-to", "feedback-id", "sender", "list-id")] == [1] * 5


def test_trace_and_transport_fields_are_never_signed():
    names = select_signed_headers(
        ["Return-Path", "Received", "DKIM-Signature", "X-Mailer", "X-Campaign", "ARC-Seal", "From", "Received-SPF"]
    )
    assert set(names) <= SIGNED_HEADERS
    assert not {"received", "return-path", "dkim-signature", "x-mailer", "x-campaign", "arc-seal"} & set(names)


def test_names_are_matched_without_regard_to_case():
    assert select_signed_headers(["FROM", "content-TYPE"])[:2] == ("from", "content-type")


@given(st.lists(st.sampled_from(sorted(SIGNED_HEADERS) + ["Received", "X-Thing", "DKIM-Signature", "FROM", "Subject"])))
def test_each_name_is_listed_once_per_occurrence_plus_once_if_oversigned(header_names):
    counts = Counter(select_signed_headers(header_names))
    present = Counter(name.lower() for name in header_names)
    for name in SIGNED_HEADERS:
        assert counts[name] == present[name] + (name in OVERSIGNED_HEADERS)
    assert set(counts) <= SIGNED_HEADERS

from datetime import datetime, timezone

import pytest

from mtad.model import Claim, MessageClass
from mtad.policy.admission import Refusal
from mtad.policy.feedback_token import BOUNCE, UNSUBSCRIBE, make_token, read_feedback_address, read_token, verp_address
from mtad.policy.message_class import ClassDecision, classify_message, list_identity, strip_owned_headers
from mtad.policy.recent_suppressions import RecentSuppressions

KEY = b"k" * 32
NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


def test_a_token_names_its_recipient_and_only_for_its_purpose():
    token = make_token(KEY, UNSUBSCRIBE, 7, 123456789)
    assert len(token) == 39 and token == token.lower()
    assert read_token(KEY, UNSUBSCRIBE, token) == (7, 123456789)
    assert read_token(KEY, UNSUBSCRIBE, token.upper()) == (7, 123456789)  # an MTA may change the case
    assert read_token(KEY, BOUNCE, token) is None  # a link is no bounce address
    assert read_token(b"x" * 32, UNSUBSCRIBE, token) is None  # another installation's key


@pytest.mark.parametrize("mutate", [lambda t: t[:-1], lambda t: t + "a", lambda t: "b" + t[1:], lambda t: "", lambda t: "!!"])
def test_forged_or_altered_tokens_are_refused(mutate):
    token = make_token(KEY, UNSUBSCRIBE, 7, 42)
    assert read_token(KEY, UNSUBSCRIBE, mutate(token)) is None


def test_a_token_for_one_tenant_cannot_be_turned_into_another_tenants():
    token = make_token(KEY, UNSUBSCRIBE, 1, 42)
    import base64

    raw = bytearray(base64.b32decode(token.upper() + "=" * (-len(token) % 8)))
    raw[3] = 2  # tenant 1 -> 2, MAC unchanged
    forged = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
    assert read_token(KEY, UNSUBSCRIBE, forged) is None


def test_verp_addresses_round_trip_and_need_the_bounce_domain():
    address = verp_address(KEY, 3, 99, "bounces.example")
    assert address.startswith("b-") and address.endswith("@bounces.example")
    assert len(address.split("@")[0]) <= 64
    assert read_feedback_address(KEY, address, "bounces.example") == (BOUNCE, 3, 99)
    assert read_feedback_address(KEY, address.upper(), "bounces.example") == (BOUNCE, 3, 99)
    assert read_feedback_address(KEY, address, "other.example") is None
    mailto = f"u-{make_token(KEY, UNSUBSCRIBE, 3, 99)}@bounces.example"
    assert read_feedback_address(KEY, mailto, "bounces.example") == (UNSUBSCRIBE, 3, 99)
    assert read_feedback_address(KEY, "b-" + mailto[2:], "bounces.example") is None  # purpose is signed


@pytest.mark.parametrize(
    ("fields", "default", "expected"),
    [
        ([], MessageClass.MARKETING, ClassDecision(MessageClass.MARKETING, "")),
        ([], MessageClass.TRANSACTIONAL, ClassDecision(MessageClass.TRANSACTIONAL, "")),
        ([("x-mtad-class", "Transactional")], MessageClass.MARKETING, ClassDecision(MessageClass.TRANSACTIONAL, "")),
        ([("x-mtad-list", "Offers")], MessageClass.MARKETING, ClassDecision(MessageClass.MARKETING, "offers")),
        ([("list-id", "Weekly news <weekly.acme.example>")], MessageClass.MARKETING,
         ClassDecision(MessageClass.MARKETING, "weekly.acme.example")),
        ([("x-mtad-class", "spam")], MessageClass.MARKETING, Refusal("550 5.6.0 X-Mtad-Class must be marketing or transactional")),
    ],
)
def test_class_and_list_come_from_control_headers_or_the_tenants_default(fields, default, expected):
    assert classify_message(fields, default) == expected


def test_list_identity_keeps_only_safe_characters():
    assert list_identity("a b\r\nc<>", None) == "abc"


def test_owned_headers_are_removed_with_their_continuations():
    block = (b"From: a@b.example\r\nX-Mtad-Class: marketing\r\nList-Unsubscribe: <https://x>,\r\n <mailto:y>\r\n"
             b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nSubject: s\r\n")
    assert strip_owned_headers(block) == b"From: a@b.example\r\nSubject: s\r\n"


def claim(address="a@x.example", message_class=MessageClass.MARKETING, list_id="offers", tenant=1) -> Claim:
    return Claim(1, 1, "Q", tenant, "s@t", address, "x.example", 0, NOW, NOW, message_class, list_id)


def test_recent_unsubscribe_blocks_leased_marketing_of_that_list_only():
    recent = RecentSuppressions(ttl_s=60)
    recent.add("1 unsubscribed offers A@x.example", now=0)
    assert recent.blocks(claim(), 1)
    assert not recent.blocks(claim(list_id="other"), 1)
    assert not recent.blocks(claim(message_class=MessageClass.TRANSACTIONAL), 1)
    assert not recent.blocks(claim(tenant=2), 1)  # another tenant's list is not affected
    assert not recent.blocks(claim(), 61)  # forgotten after the lease time


def test_recent_hard_bounce_blocks_every_class():
    recent = RecentSuppressions(ttl_s=60)
    recent.add("1 hard_bounce * a@x.example", now=0)
    assert recent.blocks(claim(message_class=MessageClass.TRANSACTIONAL, list_id=""), 1)

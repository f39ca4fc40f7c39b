"""Envelope address parsing: the plain-address fast path gives email-validator's answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtad.policy.addresses import AddressError, ParsedAddress, _plain_address, _validate, parse_address

ATOM = "abcxyzABCXYZ0189!#$&'*+/=?^_`{|}~-"
LABELS = ["example", "gmail", "com", "nl", "co", "uk", "xn--bcher-kva", "bücher", "ex-ample", "-bad", "bad-", "a" * 63,
          "a" * 64, "123", "test", "local", "localhost", "invalid", "ab--cd", "EXAMPLE", "mail"]


def _full(text: str) -> ParsedAddress | str:
    """What email-validator alone concludes, in the fast path's terms."""
    try:
        valid = _validate(text)
    except Exception as error:  # noqa: BLE001 - any refusal
        return type(error).__name__
    return ParsedAddress(f"{valid.local_part}@{valid.domain}", valid.local_part, valid.domain, valid.ascii_domain,
                         not valid.local_part.isascii())


def _fast(text: str) -> ParsedAddress | str | None:
    try:
        return _plain_address(text)
    except Exception as error:  # noqa: BLE001 - any refusal
        return type(error).__name__


local_parts = st.one_of(
    st.text(alphabet=ATOM + ".", min_size=0, max_size=70),
    st.sampled_from(["postmaster", "PostMaster", "info", "Sales", "a" * 64, "a" * 65, "a" * 240, "jo.hn", "é"]),
)
domains = st.one_of(st.lists(st.sampled_from(LABELS), min_size=1, max_size=5).map(".".join),
                    st.text(alphabet="abc.-09ü", max_size=20))


@settings(max_examples=3000, deadline=None)
@given(local_parts, domains)
def test_the_fast_path_answers_as_email_validator_does(local, domain):
    text = f"{local}@{domain}"
    fast = _fast(text)
    if fast is None:
        return  # not a plain address: email-validator decides, as before
    assert fast == _full(text)


@pytest.mark.parametrize(
    "text",
    ["john.doe@example.com", "x@EXAMPLE.Com", "a+tag@mail.example.nl", "o'brien@example.co.uk", "u@xn--bcher-kva.example"],
)
def test_plain_addresses_take_the_fast_path_with_email_validators_result(text):
    fast = _plain_address(text)
    assert fast is not None and fast == _full(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Postmaster@example.com", "postmaster@example.com"),  # RFC 2142 names are case-insensitive
        ("a@bücher.example", "a@bücher.example"),
        ("a@xn--bcher-kva.example", "a@bücher.example"),
    ],
)
def test_addresses_are_normalised_the_same_way_on_either_path(text, expected):
    assert parse_address(text, smtputf8=False, role="recipient").address == expected


@pytest.mark.parametrize("text", ["a..b@example.com", ".a@example.com", "a@example", "a@example.local", "a@-x.com",
                                  "a@123", "a@" + "b" * 64 + ".com", "a" * 250 + "@example.com"])
def test_bad_addresses_are_refused_with_a_syntax_reply(text):
    with pytest.raises(AddressError, match="553 5.1.3"):
        parse_address(text, smtputf8=False, role="recipient")

import pytest

from mtad.model import Tenant
from mtad.policy.addresses import ParsedAddress
from mtad.policy.admission import (
    AUTH_REQUIRED,
    Refusal,
    admit_content,
    admit_recipient,
    admit_sender,
    from_header_domains,
)

ACME = Tenant(id=1, name="acme", domains=frozenset({"acme.example", "xn--bcher-kva.example"}))


def test_no_tenant_means_no_relay():
    assert admit_sender(None, "a@acme.example", smtputf8=False) == Refusal(AUTH_REQUIRED)
    assert admit_recipient(None, "x@y.example", smtputf8=False, accepted_so_far=0, max_recipients=10) == Refusal(
        AUTH_REQUIRED
    )
    assert admit_content(None, ["acme.example"]) == Refusal(AUTH_REQUIRED)


@pytest.mark.parametrize(
    ("mail_from", "accepted"),
    [
        ("news@acme.example", True),
        ("bounces@mail.acme.example", True),  # a subdomain of an own domain is own
        ("news@ACME.example", True),
        ("news@bücher.example", True),  # IDN written in Unicode matches the stored A-label
        ("news@other.example", False),
        ("news@evilacme.example", False),  # suffix but not a subdomain
        ("news@acme.example.evil", False),
    ],
)
def test_sender_must_be_one_of_the_tenants_domains(mail_from, accepted):
    decision = admit_sender(ACME, mail_from, smtputf8=False)
    assert isinstance(decision, ParsedAddress) is accepted
    if not accepted:
        assert decision.reply.startswith("553 5.7.1")


def test_null_sender_is_refused_for_submission():
    decision = admit_sender(ACME, "", smtputf8=False)
    assert isinstance(decision, Refusal) and decision.reply.startswith("550 5.7.1")


@pytest.mark.parametrize(
    "rcpt",
    [
        "user%other.example@acme.example",  # %-hack
        '"user@other"@acme.example',  # quoted local part
        "@relay.example:user@other.example",  # source route
        "user@[192.0.2.1]",  # IP literal
        "no-at-sign",
        "user@",
        "user@-bad-.example",
        "us\r\ner@x.example",
    ],
)
def test_relay_tricks_and_bad_syntax_are_refused_with_5_1_3(rcpt):
    decision = admit_recipient(ACME, rcpt, smtputf8=False, accepted_so_far=0, max_recipients=10)
    assert isinstance(decision, Refusal)
    assert decision.reply.startswith("553 5.1.3")


def test_recipient_idn_domain_is_routed_by_its_a_label():
    decision = admit_recipient(ACME, "info@bücher.example", smtputf8=False, accepted_so_far=0, max_recipients=10)
    assert isinstance(decision, ParsedAddress)
    assert decision.ascii_domain == "xn--bcher-kva.example"


def test_non_ascii_local_part_needs_smtputf8():
    refused = admit_recipient(ACME, "jösé@x.example", smtputf8=False, accepted_so_far=0, max_recipients=10)
    assert isinstance(refused, Refusal) and refused.reply.startswith("553 5.6.7")
    accepted = admit_recipient(ACME, "jösé@x.example", smtputf8=True, accepted_so_far=0, max_recipients=10)
    assert isinstance(accepted, ParsedAddress) and accepted.needs_smtputf8


def test_too_many_recipients_is_a_452_so_the_client_sends_the_rest_later():
    decision = admit_recipient(ACME, "x@y.example", smtputf8=False, accepted_so_far=3, max_recipients=3)
    assert isinstance(decision, Refusal) and decision.reply.startswith("452 4.5.3")


@pytest.mark.parametrize(
    ("addresses", "reply_start"),
    [
        (["news@acme.example"], None),
        (["news@acme.example", "sales@mail.acme.example"], None),
        (["news@other.example"], "550 5.7.1"),
        (["news@acme.example", "x@other.example"], "550 5.7.1"),
        (None, "550 5.6.0"),
        (["not an address"], "550 5.6.0"),
    ],
)
def test_from_header_must_exist_and_name_only_own_domains(addresses, reply_start):
    refusal = admit_content(ACME, from_header_domains(addresses))
    if reply_start is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.reply.startswith(reply_start)

"""DKIM signatures made by mtad.sign, checked by an independent verifier (dkimpy) against the published record."""

from __future__ import annotations

import base64
import os
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from mtad.policy.message_text import normalize_line_endings
from mtad.sign.dkim import DkimSigner, canonicalize_body, canonicalize_header
from mtad.sign.keys import (
    DomainKey,
    KeyFileError,
    dns_record_name,
    dns_record_value,
    generate_private_key,
    load_key_directory,
    write_key,
    zone_file_record,
)

NOW = 1_764_000_000  # 2025-11-24: dkimpy refuses a t= in the future

MESSAGE = (
    b"Received: from app1 by mta.example.com with ESMTPSA id Q1;\r\n\tWed, 25 Nov 2026 09:30:00 +0000\r\n"
    b"From: Acme News <news@news.example.com>\r\n"
    b"To: someone@example.net\r\n"
    b"Subject:  November   offers,\r\n\tfolded \r\n"
    b"Date: Wed, 25 Nov 2026 09:30:00 +0000\r\n"
    b"Message-ID: <Q1@mta.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://u.example.com/u/abc>, <mailto:u@example.com?subject=abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Campaign: 42\r\n"
    b"\r\n"
    b"Hello,  \r\n\r\n\tthis month   we have offers.\r\n\r\n\r\n"
)


@pytest.fixture(scope="module")
def rsa_key():
    return DomainKey("example.com", "s2026", "rsa-sha256", generate_private_key("rsa"))


@pytest.fixture(scope="module")
def ed_key():
    return DomainKey("example.com", "e2026", "ed25519-sha256", generate_private_key("ed25519"))


def dns_for(*keys):
    records = {f"{dns_record_name(key)}.".encode(): dns_record_value(key).encode() for key in keys}
    return lambda name, timeout=5: records.get(name)


def verify_each(message: bytes, dnsfunc) -> list[bool]:
    """dkim.verify() checks the first signature only; check every DKIM-Signature field in turn."""
    count = len(re.findall(rb"^DKIM-Signature:", message, re.MULTILINE | re.IGNORECASE))
    return [dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc) for index in range(count)]


def signature_tags(field: bytes) -> dict[bytes, bytes]:
    value = re.sub(rb"\r\n[ \t]+", b" ", field.split(b":", 1)[1])
    return dkim.util.parse_tag_value(value)


def needs_nacl():
    pytest.importorskip("nacl", reason="dkimpy verifies ed25519 with PyNaCl (dkimpy[ed25519]); install pynacl")


def test_an_rsa_signature_verifies(rsa_key):
    signer = DkimSigner({"example.com": [rsa_key]})
    signed = signer.sign(MESSAGE, "example.com", NOW) + MESSAGE
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))


def test_an_ed25519_signature_verifies(ed_key):
    needs_nacl()
    signer = DkimSigner({"example.com": [ed_key]})
    signed = signer.sign(MESSAGE, "example.com", NOW) + MESSAGE
    assert dkim.verify(signed, dnsfunc=dns_for(ed_key))


def test_dual_signatures_both_verify_rsa_first(rsa_key, ed_key):
    needs_nacl()
    header = DkimSigner({"example.com": [rsa_key, ed_key]}).sign(MESSAGE, "example.com", NOW)
    fields = re.split(rb"\r\n(?=DKIM-Signature:)", header)
    assert len(fields) == 2
    first, second = signature_tags(fields[0]), signature_tags(fields[1])
    assert (first[b"a"], second[b"a"]) == (b"rsa-sha256", b"ed25519-sha256")
    assert first[b"bh"] == second[b"bh"]
    assert verify_each(header + MESSAGE, dns_for(rsa_key, ed_key)) == [True, True]


def test_the_signature_carries_the_agreed_tags(rsa_key):
    header = DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW)
    tags = signature_tags(header)
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"d"] == b"example.com" and tags[b"s"] == b"s2026"
    assert tags[b"t"] == str(NOW).encode()
    assert b"x" not in tags and b"l" not in tags
    assert header.endswith(b"\r\n") and b"\n" not in header.replace(b"\r\n", b"")
    assert all(len(line.expandtabs()) <= 78 for line in header.split(b"\r\n"))


def test_list_unsubscribe_fields_are_in_h_and_trace_fields_are_not(rsa_key):
    tags = signature_tags(DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW))
    signed = [name.strip() for name in tags[b"h"].split(b":")]
    assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed
    assert b"received" not in signed and b"x-campaign" not in signed


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"Subject:  November   offers,", b"Subject: December offers,"),
        (b"To: someone@example.net", b"To: someone-else@example.net"),
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: nothing"),
        (b"this month   we have offers.", b"this month we have no offers."),
    ],
)
def test_a_change_after_signing_fails_verification(rsa_key, before, after):
    signed = DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW) + MESSAGE
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))
    assert not dkim.verify(signed.replace(before, after), dnsfunc=dns_for(rsa_key))


@pytest.mark.parametrize(
    "added",
    [b"From: Mallory <m@evil.example>\r\n", b"Subject: Act now\r\n", b"Reply-To: m@evil.example\r\n"],
)
def test_adding_a_field_after_signing_fails_because_it_is_oversigned(rsa_key, added):
    # Added above the original, where a verifier that takes instances bottom-up would not look without over-signing.
    header = DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW)
    assert dkim.verify(header + MESSAGE, dnsfunc=dns_for(rsa_key))
    assert not dkim.verify(header + added + MESSAGE, dnsfunc=dns_for(rsa_key))


def test_adding_an_unsigned_trace_field_keeps_the_signature(rsa_key):
    signed = DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW) + MESSAGE
    relayed = b"Received: from mta.example.com by mx.example.net; Wed, 25 Nov 2026 09:31:00 +0000\r\n" + signed
    assert dkim.verify(relayed, dnsfunc=dns_for(rsa_key))


def test_whitespace_changes_within_relaxed_canonicalisation_keep_the_signature(rsa_key):
    signed = DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.com", NOW) + MESSAGE
    refolded = signed.replace(b"To: someone@example.net", b"To:\r\n someone@example.net  ")
    refolded = refolded.replace(b"we have offers.\r\n", b"we have \t offers. \r\n\r\n")
    assert dkim.verify(refolded, dnsfunc=dns_for(rsa_key))


def test_a_bare_lf_message_verifies_once_the_caller_normalises_it(rsa_key):
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    with pytest.raises(ValueError, match="CRLF"):
        DkimSigner({"example.com": [rsa_key]}).sign(lf_message, "example.com", NOW)
    normalised = normalize_line_endings(lf_message)
    signed = DkimSigner({"example.com": [rsa_key]}).sign(normalised, "example.com", NOW) + normalised
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))


@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n", b"no final line break"])
def test_empty_and_unterminated_bodies_verify(rsa_key, body):
    message = b"From: a@example.com\r\nSubject: s\r\n\r\n" + body
    signed = DkimSigner({"example.com": [rsa_key]}).sign(message, "example.com", NOW) + message
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))


def test_a_parent_domain_key_signs_for_its_subdomains(rsa_key):
    signer = DkimSigner({"example.com": [rsa_key]})
    assert signer.key_domain_for("news.example.com") == "example.com"
    assert signer.key_domain_for("Example.COM.") == "example.com"
    assert signer.key_domain_for("notexample.com") is None
    header = signer.sign(MESSAGE, "news.example.com", NOW)
    assert signature_tags(header)[b"d"] == b"example.com"
    assert dkim.verify(header + MESSAGE, dnsfunc=dns_for(rsa_key))


def test_an_internationalised_from_domain_finds_the_key_of_its_a_label(rsa_key):
    idn_key = DomainKey("xn--bcher-kva.example", "s1", "rsa-sha256", rsa_key.private_key)
    signer = DkimSigner({"xn--bcher-kva.example": [idn_key]})
    assert signer.key_domain_for("news.bücher.example") == "xn--bcher-kva.example"
    assert signer.key_domain_for("bad..bücher") is None


def test_the_nearest_domain_with_a_key_wins(rsa_key):
    news_key = DomainKey("news.example.com", "n1", "rsa-sha256", rsa_key.private_key)
    signer = DkimSigner({"example.com": [rsa_key], "news.example.com": [news_key]})
    assert signer.key_domain_for("a.news.example.com") == "news.example.com"
    assert signature_tags(signer.sign(MESSAGE, "news.example.com", NOW))[b"d"] == b"news.example.com"


def test_no_key_for_the_domain_means_no_signature(rsa_key):
    assert DkimSigner({"example.com": [rsa_key]}).sign(MESSAGE, "example.org", NOW) == b""
    assert DkimSigner({}).sign(MESSAGE, "example.com", NOW) == b""


_WSP_TEXT = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r\n", b"  ", b"="]), max_size=40).map(b"".join)


@given(_WSP_TEXT)
def test_body_canonicalisation_matches_dkimpy(body):
    body = normalize_line_endings(body)
    assert canonicalize_body(body) == Relaxed.canonicalize_body(body)


@given(st.sampled_from([b"Subject", b"SUBJECT", b"x-y"]), _WSP_TEXT)
def test_header_canonicalisation_matches_dkimpy(name, value):
    value = normalize_line_endings(value).replace(b"\r\n", b"\r\n ")  # a continuation line starts with WSP
    [(dk_name, dk_value)] = Relaxed.canonicalize_headers([(name, value + b"\r\n")])
    assert canonicalize_header(name, value) == dk_name + b":" + dk_value


# Key files


def test_keys_written_to_the_directory_load_back_rsa_first(tmp_path, rsa_key, ed_key):
    write_key(tmp_path, "example.com", "e2026", ed_key.private_key)
    write_key(tmp_path, "example.com", "s2026", rsa_key.private_key)
    loaded = load_key_directory(tmp_path)
    assert list(loaded) == ["example.com"]
    assert [(k.selector, k.algorithm) for k in loaded["example.com"]] == [
        ("s2026", "rsa-sha256"),
        ("e2026", "ed25519-sha256"),
    ]
    assert os.stat(tmp_path / "example.com" / "s2026.rsa.pem").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "example.com").st_mode & 0o777 == 0o700


def test_an_existing_key_is_never_overwritten(tmp_path, rsa_key, ed_key):
    write_key(tmp_path, "example.com", "s1", rsa_key.private_key)
    before = (tmp_path / "example.com" / "s1.rsa.pem").read_bytes()
    with pytest.raises(KeyFileError, match="exists already"):
        write_key(tmp_path, "example.com", "s1", generate_private_key("rsa"))
    assert (tmp_path / "example.com" / "s1.rsa.pem").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "example.com").iterdir()) == ["s1.rsa.pem"]


def test_a_missing_key_directory_means_no_keys(tmp_path):
    assert load_key_directory(tmp_path / "absent") == {}


@pytest.mark.parametrize(
    ("name", "content", "complaint"),
    [
        ("s1.rsa.pem", b"not a key", "not an unencrypted PEM private key"),
        ("s1.pem", None, "is named <selector>"),
        ("s1.ed25519.pem", None, "says ed25519"),
    ],
)
def test_an_unusable_key_file_is_named_in_the_error(tmp_path, rsa_key, name, content, complaint):
    pem = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "example.com").mkdir()
    path = tmp_path / "example.com" / name
    path.write_bytes(pem if content is None else content)
    with pytest.raises(KeyFileError, match=complaint) as error:
        load_key_directory(tmp_path)
    assert str(path) in str(error.value)


def test_an_unreadable_key_file_is_named_in_the_error(tmp_path, rsa_key):
    write_key(tmp_path, "example.com", "s1", rsa_key.private_key)
    path = tmp_path / "example.com" / "s1.rsa.pem"
    path.unlink()
    path.mkdir()  # unreadable as a file, even for root
    (tmp_path / "example.com" / "s1.rsa.pem" / "x").touch()
    with pytest.raises(KeyFileError, match="cannot read") as error:
        load_key_directory(tmp_path)
    assert str(path) in str(error.value)


def test_dns_records_follow_rfc_6376_and_rfc_8463(rsa_key, ed_key):
    ed_value = dns_record_value(ed_key)
    assert ed_value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_value.split("p=")[1])) == 32
    rsa_value = dns_record_value(rsa_key)
    der = base64.b64decode(rsa_value.split("p=")[1])
    assert serialization.load_der_public_key(der).key_size == 2048
    assert dns_record_name(rsa_key) == "s2026._domainkey.example.com"


def test_a_long_record_is_split_into_strings_of_at_most_255_characters(rsa_key):
    line = zone_file_record(rsa_key)
    strings = re.findall(r'"([^"]*)"', line)
    assert line.startswith("s2026._domainkey.example.com. IN TXT (")
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dns_record_value(rsa_key)

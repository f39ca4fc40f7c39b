"""MAIL/RCPT path parsing: the regular-expression fast path agrees with the email package's parser."""

import pytest

from mtad.ingest.protocol import _PLAIN_PATH, SubmissionSMTP


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<a.b+c@x-y.example> SIZE=100 BODY=8BITMIME",
        "<news@acme.example>  SMTPUTF8",
        "<a@b.example>SIZE=1",
        "<o'neil#1@mail.example.co.uk>",
    ],
)
def test_plain_paths_take_the_fast_path_and_parse_as_the_email_package_does(arg):
    assert _PLAIN_PATH.match(arg)
    smtp = SubmissionSMTP.__new__(SubmissionSMTP)
    smtp.local_part_limit = 0
    assert smtp._getaddr(arg) == SubmissionSMTP._parse_path(arg)


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("<a..b@c.example>", "a..b@c.example"),  # not a dot-atom: the general parser decides
        ('<"q"@b.example>', "q@b.example"),
        ("<@x:a@b.example>", "a@b.example"),  # a source route
        ("<a@b.>", None),
    ],
)
def test_other_paths_go_the_general_way(arg, expected):
    assert not _PLAIN_PATH.match(arg)
    smtp = SubmissionSMTP.__new__(SubmissionSMTP)
    smtp.local_part_limit = 0
    assert smtp._getaddr(arg)[0] == expected


def test_the_local_part_limit_applies_to_the_fast_path_too():
    smtp = SubmissionSMTP.__new__(SubmissionSMTP)
    smtp.local_part_limit = 4
    assert smtp._getaddr("<abcde@b.example>") == (None, None)
    assert smtp._getaddr("<abcd@b.example>") == ("abcd@b.example", "")

"""`mtad bounce parse FILE [--json]` as an operator uses it on a saved message."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtad.cli import bounce as bounce_cli
from mtad.cli.main import build_parser

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
NO_SETTINGS = SimpleNamespace()  # no feedback section: the installation's config/bounce_rules.toml


def run_in_process(capsys, settings, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mtad")
    bounce_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bounce", "parse", *argv])
    code = args.handler(settings, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_prints_the_kind_and_one_line_per_recipient(capsys):
    code, out, err = run_in_process(capsys, NO_SETTINGS, str(FIXTURES / "qmail_two_recipients.eml"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kind: bounce (")
    recipients = [line for line in lines if line.startswith("recipient: ")]
    assert recipients == [
        "recipient: ken@example.net  action=failed  status=5.1.1  category=invalid_recipient  hard"
        "  diagnostic=Sorry, no mailbox here by that name. (#5.1.1)",
        "recipient: lena@example.org  action=failed  status=5.1.1  category=invalid_recipient  hard"
        "  diagnostic=550 5.1.1 <lena@example.org>... User unknown",
    ]
    assert "x-mtad-queue-id=06DBD5Z800000C26" in lines[-1]


def test_parse_shows_soft_bounces_complaints_and_auto_replies(capsys):
    _, out, _ = run_in_process(capsys, NO_SETTINGS, str(FIXTURES / "gmail_rate_limited_delayed.eml"))
    assert "kim@workspace.example  action=delayed  status=4.7.28  category=rate_limited  soft" in out
    _, out, _ = run_in_process(capsys, NO_SETTINGS, str(FIXTURES / "arf_abuse_complaint.eml"))
    assert out.startswith("kind: complaint") and "complained: mia@isp.example  feedback-type=abuse" in out
    _, out, _ = run_in_process(capsys, NO_SETTINGS, str(FIXTURES / "auto_reply_out_of_office_x_autoreply.eml"))
    assert out.startswith("kind: auto_reply") and "recipient:" not in out


def test_parse_json_prints_the_whole_verdict(capsys):
    code, out, _ = run_in_process(capsys, NO_SETTINGS, str(FIXTURES / "postfix_user_unknown.eml"), "--json")
    assert code == 0
    verdict = json.loads(out)
    assert verdict["kind"] == "bounce"
    assert verdict["recipients"] == [{
        "recipient": "alice@example.net",
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 <alice@example.net>: Recipient address rejected: User unknown in virtual "
                      "mailbox table",
        "remote_mta": "mailstore.example.net",
        "category": "invalid_recipient",
        "hard": True,
    }]
    assert verdict["original_headers"]["x-mtad-queue-id"] == "06DBD5Z800000C1S"
    assert verdict["original_envelope_from"] == "b-aaaaabyaaaaaaaab4jakellwnt6tjzaefusqkda@bounces.example.com"


def test_an_unreadable_file_exits_1(capsys, tmp_path):
    code, out, err = run_in_process(capsys, NO_SETTINGS, str(tmp_path / "missing.eml"))
    assert code == 1 and out == "" and "cannot read" in err and "missing.eml" in err


def test_a_message_that_is_no_report_still_gets_a_verdict(capsys, tmp_path):
    junk = tmp_path / "junk.eml"
    junk.write_bytes(b"\x00\xff garbage \r\n\r\n--")
    code, out, _ = run_in_process(capsys, NO_SETTINGS, str(junk), "--json")
    assert code == 0 and json.loads(out)["kind"] == "unknown"


def test_the_rules_file_setting_is_used(capsys, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\ncategory = \"other\"\nhard = false\npatterns = ['user unknown']\n")
    settings = SimpleNamespace(feedback=SimpleNamespace(bounce_rules_file=str(rules)))
    _, out, _ = run_in_process(capsys, settings, str(FIXTURES / "postfix_user_unknown.eml"))
    assert "category=other  soft" in out
    rules.write_text("[[rule]]\ncategory = \"nope\"\nhard = false\npatterns = ['x']\n")
    code, out, err = run_in_process(capsys, settings, str(FIXTURES / "postfix_user_unknown.eml"))
    assert code == 2 and out == "" and "rule 1.category" in err


def test_an_empty_rules_file_setting_means_the_installation_rules(capsys):
    settings = SimpleNamespace(feedback=SimpleNamespace(bounce_rules_file=""))
    _, out, _ = run_in_process(capsys, settings, str(FIXTURES / "postfix_user_unknown.eml"))
    assert "category=invalid_recipient  hard" in out


def _bounce_is_registered() -> bool:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "bounce" in commands.choices


@pytest.mark.skipif(not _bounce_is_registered(), reason="`mtad bounce` is not yet registered in mtad/cli/main.py")
def test_the_mtad_command_parses_a_bounce(tmp_path):
    config = tmp_path / "mtad.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')

    def mtad(*args):
        return subprocess.run(
            [sys.executable, "-m", "mtad", "--config", str(config), "bounce", "parse", *args],
            capture_output=True, text=True, timeout=60,
        )

    done = mtad(str(FIXTURES / "office365_recipient_not_found.eml"), "--json")
    assert done.returncode == 0, done.stderr
    (recipient,) = json.loads(done.stdout)["recipients"]
    assert (recipient["recipient"], recipient["status"], recipient["hard"]) == (
        "grace.hall@contoso.example", "5.1.10", True
    )
    missing = mtad(str(tmp_path / "missing.eml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr

"""`mtad dkim keygen|show` as an operator uses them: the printed TXT record must validate what mtad signs."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from types import SimpleNamespace

import dkim
import pytest

from mtad.cli import dkim as dkim_cli
from mtad.cli.main import build_parser
from mtad.config import parse_settings
from mtad.sign.dkim import DkimSigner
from mtad.sign.keys import load_key_directory

NOW = 1_764_000_000
MESSAGE = b"From: News <news@news.example.com>\r\nTo: a@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
_RECORD = re.compile(r'^(\S+)\.\s+IN\s+TXT\s+(.+)$', re.MULTILINE)


def published(output: str) -> dict[bytes, bytes]:
    """The zone-file lines as a resolver would answer them: quoted strings concatenated."""
    return {
        f"{name}.".encode(): "".join(re.findall(r'"([^"]*)"', strings)).encode()
        for name, strings in _RECORD.findall(output)
    }


def verifies_with(records: dict[bytes, bytes], key_dir, algorithm: str) -> bool:
    keys = {
        domain: [k for k in found if k.algorithm == algorithm]
        for domain, found in load_key_directory(key_dir).items()
    }
    signed = DkimSigner(keys).sign(MESSAGE, "news.example.com", NOW) + MESSAGE
    return dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))


@pytest.fixture
def settings(tmp_path):
    return parse_settings({"state_dir": str(tmp_path / "state")}, {})


def run_in_process(settings, capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mtad")
    dkim_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.handler(settings, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_writes_a_private_key_and_prints_a_record_that_validates_its_signatures(settings, capsys):
    code, out, err = run_in_process(settings, capsys, "dkim", "keygen", "Example.COM", "--selector", "s2026")
    assert code == 0, err
    key_file = settings.state_path / "dkim" / "example.com" / "s2026.rsa.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    records = published(out)
    assert list(records) == [b"s2026._domainkey.example.com."]
    assert records[b"s2026._domainkey.example.com."].startswith(b"v=DKIM1; k=rsa; p=")
    assert verifies_with(records, settings.state_path / "dkim", "rsa-sha256")


def test_keygen_ed25519_prints_the_raw_public_key_record(settings, capsys):
    pytest.importorskip("nacl", reason="dkimpy verifies ed25519 with PyNaCl (dkimpy[ed25519]); install pynacl")
    code, out, err = run_in_process(
        settings, capsys, "dkim", "keygen", "example.com", "--selector", "e1", "--algo", "ed25519"
    )
    assert code == 0, err
    records = published(out)
    assert re.fullmatch(rb"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", records[b"e1._domainkey.example.com."])
    assert verifies_with(records, settings.state_path / "dkim", "ed25519-sha256")


def test_keygen_refuses_to_overwrite_an_existing_key(settings, capsys):
    assert run_in_process(settings, capsys, "dkim", "keygen", "example.com", "--selector", "s1")[0] == 0
    key_file = settings.state_path / "dkim" / "example.com" / "s1.rsa.pem"
    before = key_file.read_bytes()
    code, out, err = run_in_process(settings, capsys, "dkim", "keygen", "example.com", "--selector", "s1")
    assert code == 1 and "exists already" in err and str(key_file) in err and out == ""
    assert key_file.read_bytes() == before


def test_keygen_rejects_a_bad_selector_and_a_small_rsa_key(settings, capsys):
    code, _, err = run_in_process(settings, capsys, "dkim", "keygen", "example.com", "--selector", "a b")
    assert code == 1 and "selector" in err
    code, _, err = run_in_process(settings, capsys, "dkim", "keygen", "example.com", "--selector", "s", "--bits", "512")
    assert code == 1 and "at least 1024 bits" in err


def test_show_prints_the_records_of_every_key_of_a_domain(settings, capsys):
    _, rsa_out, _ = run_in_process(settings, capsys, "dkim", "keygen", "example.com", "--selector", "s1")
    _, ed_out, _ = run_in_process(
        settings, capsys, "dkim", "keygen", "example.com", "--selector", "e1", "--algo", "ed25519"
    )
    code, out, _ = run_in_process(settings, capsys, "dkim", "show", "example.com")
    assert code == 0 and published(out) == {**published(rsa_out), **published(ed_out)}
    code, _, err = run_in_process(settings, capsys, "dkim", "show", "other.example")
    assert code == 1 and "no DKIM key for other.example" in err


def test_the_key_directory_setting_wins_over_the_state_directory(tmp_path):
    settings = SimpleNamespace(dkim=SimpleNamespace(key_dir=str(tmp_path / "keys")), state_path=tmp_path / "state")
    assert dkim_cli.key_directory(settings) == tmp_path / "keys"
    assert dkim_cli.key_directory(SimpleNamespace(state_path=tmp_path / "state")) == tmp_path / "state" / "dkim"


def _dkim_is_registered() -> bool:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "dkim" in commands.choices


@pytest.mark.skipif(not _dkim_is_registered(), reason="`mtad dkim` is not yet registered in mtad/cli/main.py")
def test_the_mtad_command_generates_a_key_that_signs_verifiably(tmp_path):
    config = tmp_path / "mtad.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')

    def mtad(*args):
        return subprocess.run(
            [sys.executable, "-m", "mtad", "--config", str(config), "dkim", *args],
            capture_output=True, text=True, timeout=60,
        )

    made = mtad("keygen", "example.com", "--selector", "s2026", "--algo", "rsa", "--bits", "2048")
    assert made.returncode == 0, made.stderr
    key_dir = tmp_path / "state" / "dkim"
    assert (key_dir / "example.com" / "s2026.rsa.pem").stat().st_mode & 0o777 == 0o600
    assert verifies_with(published(made.stdout), key_dir, "rsa-sha256")
    again = mtad("keygen", "example.com", "--selector", "s2026")
    assert again.returncode == 1 and "exists already" in again.stderr
    shown = mtad("show", "example.com")
    assert shown.returncode == 0 and published(shown.stdout) == published(made.stdout)
